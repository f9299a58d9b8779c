"""The shared Bayes token store: one Redis database that several filterd nodes learn into.

Trusts: the Redis server named by bayes.redis_url (loopback or a private network: Redis has
no per-key permissions). Reads no settings itself (url and prefix come from
filterd.stores.open_token_store). Emits no symbols. Needs the `redis` Python package (extra
`filterd[redis]`).

Layout under the key prefix P (default "filterd:bayes:"):
  P S         hash  token -> spam count          P H   hash  token -> ham count
  P A         hash  token -> day last learned    P L   hash  digest -> "spam" | "ham"
  P C         hash  "spam" / "ham" -> messages learned
Reading a message's tokens is two HMGETs in one round trip. Each learned message is one Lua
script, which Redis runs atomically: the digest decision, the token counts, the counter and
the digest change together, so any number of learners on any number of nodes end with exact
counts. A batch is sent as one pipeline of scripts.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

from filterd.stores import (HAM, SPAM, ExpiryResult, LearnItem, LearnResult, StoreError,
                            StoreStats)

try:
    import redis as redis_lib
except ModuleNotFoundError:  # optional extra
    redis_lib = None

_LEARN = """
local old = redis.call('HGET', KEYS[4], ARGV[1])
local new = ARGV[2]
if old and ARGV[4] == '1' then return 'noop' end
if new == '' then
  if not old then return 'noop' end
elseif old == new then
  return 'noop'
end
local function add(label, delta)
  local key, other = KEYS[1], KEYS[2]
  if label == 'ham' then key, other = KEYS[2], KEYS[1] end
  for i = 5, #ARGV do
    local tok = ARGV[i]
    local v = redis.call('HINCRBY', key, tok, delta)
    if v <= 0 then
      redis.call('HDEL', key, tok)
      if redis.call('HEXISTS', other, tok) == 0 then redis.call('HDEL', KEYS[3], tok) end
    elseif delta > 0 then
      redis.call('HSET', KEYS[3], tok, ARGV[3])
    end
  end
  if redis.call('HINCRBY', KEYS[5], label, delta) < 0 then redis.call('HSET', KEYS[5], label, 0) end
end
if old then add(old, -1) end
if new == '' then
  redis.call('HDEL', KEYS[4], ARGV[1])
  return 'forgotten'
end
add(new, 1)
redis.call('HSET', KEYS[4], ARGV[1], new)
if old then return 'moved' end
return 'learned'
"""

# Delete the given tokens, but only those still last learned before the cutoff day (a
# learner may have refreshed one since the scan saw it).
_EXPIRE = """
local n = 0
for i = 1, #ARGV do
  local day = tonumber(redis.call('HGET', KEYS[3], ARGV[i]) or '0')
  if day < tonumber(KEYS[4]) then
    redis.call('HDEL', KEYS[1], ARGV[i]); redis.call('HDEL', KEYS[2], ARGV[i])
    redis.call('HDEL', KEYS[3], ARGV[i]); n = n + 1
  end
end
return n
"""

_CHUNK = 1000


class RedisTokenStore:
    backend = "redis"

    def __init__(self, url: str, *, prefix: str = "filterd:bayes:", timeout: float = 5.0,
                 client: Any = None):
        if client is None and redis_lib is None:
            raise StoreError("bayes.backend = redis needs the 'redis' Python package "
                             "(pip install 'filterd[redis]')")
        self.url = url
        self.prefix = prefix
        try:
            self._r = client or redis_lib.Redis.from_url(url, socket_timeout=timeout,
                                                         socket_connect_timeout=timeout)
            self._learn = self._r.register_script(_LEARN)
            self._expire = self._r.register_script(_EXPIRE)
        except Exception as exc:
            raise StoreError(f"{url}: {exc}") from exc
        p = prefix
        self.k_spam, self.k_ham, self.k_atime = p + "S", p + "H", p + "A"
        self.k_learned, self.k_counts = p + "L", p + "C"

    @property
    def location(self) -> str:
        return f"{self.url} prefix {self.prefix}"

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # redis.exceptions.RedisError, OSError
            raise StoreError(f"{self.url}: {type(exc).__name__}: {exc}") from exc

    # --- reads ---------------------------------------------------------------------------
    # Reads wait on the network: the daemon runs them on a worker thread, where the
    # per-check timeout abandons them; `deadline` is accepted for the interface and the
    # socket timeout bounds each call.
    inline_reads = False

    def message_counts(self, *, deadline: float | None = None) -> tuple[int, int]:
        spam, ham = self._call(self._r.hmget, self.k_counts, SPAM, HAM)
        return int(spam or 0), int(ham or 0)

    def token_counts(self, tokens: Sequence[str], *, deadline: float | None = None
                     ) -> dict[str, tuple[int, int]]:
        if not tokens:
            return {}
        tokens = list(tokens)

        def fetch() -> list[Any]:
            pipe = self._r.pipeline(transaction=False)
            pipe.hmget(self.k_spam, tokens)
            pipe.hmget(self.k_ham, tokens)
            return pipe.execute()

        spam, ham = self._call(fetch)
        out: dict[str, tuple[int, int]] = {}
        for tok, s, h in zip(tokens, spam, ham):
            if s is not None or h is not None:
                out[tok] = (int(s or 0), int(h or 0))
        return out

    def learned_label(self, digest: str) -> str | None:
        value = self._call(self._r.hget, self.k_learned, digest)
        return value.decode() if value is not None else None

    # --- learning ------------------------------------------------------------------------
    def learn_batch(self, items: Sequence[LearnItem], day: int) -> list[LearnResult]:
        if not items:
            return []
        keys = [self.k_spam, self.k_ham, self.k_atime, self.k_learned, self.k_counts]

        def run() -> list[Any]:
            pipe = self._r.pipeline(transaction=False)
            for item in items:
                self._learn(keys=keys, args=[item.digest, item.label or "", day,
                                                   "1" if item.only_new else "0", *item.tokens],
                            client=pipe)
            return pipe.execute()

        replies = self._call(run)
        return [LearnResult(r.decode() if isinstance(r, bytes) else r) for r in replies]

    # --- maintenance ---------------------------------------------------------------------
    def expire(self, *, older_than_day: int, max_tokens: int) -> ExpiryResult:
        ages: list[tuple[int, str]] = []
        for tok, day in self._call(lambda: list(self._r.hscan_iter(self.k_atime, count=5000))):
            ages.append((int(day), tok.decode()))
        old = [tok for day, tok in ages if day < older_than_day]
        removed = self._delete_older(old, older_than_day)
        remaining = len(ages) - removed
        if max_tokens >= 0 and remaining > max_tokens:
            spam_counts = dict(self._call(lambda: list(self._r.hscan_iter(self.k_spam, count=5000))))
            ham_counts = dict(self._call(lambda: list(self._r.hscan_iter(self.k_ham, count=5000))))
            left = [(day, int(spam_counts.get(tok.encode(), 0)) + int(ham_counts.get(tok.encode(), 0)),
                     tok) for day, tok in ages if day >= older_than_day]
            left.sort()
            victims = [tok for _, _, tok in left[:remaining - max_tokens]]
            cutoff = (max(d for d, _, _ in left[:remaining - max_tokens]) + 1) if victims else 0
            removed += self._delete_older(victims, cutoff)
            remaining = len(ages) - removed
        return ExpiryResult(removed, remaining)

    def _delete_older(self, tokens: list[str], cutoff: int) -> int:
        n = 0
        keys = [self.k_spam, self.k_ham, self.k_atime, cutoff]
        for i in range(0, len(tokens), _CHUNK):
            n += int(self._call(self._expire, keys=keys, args=tokens[i:i + _CHUNK]))
        return n

    def stats(self) -> StoreStats:
        nspam, nham = self.message_counts()

        def gather() -> tuple[int, list[Any], list[Any]]:
            ntokens = self._r.hlen(self.k_atime)
            days = [int(d) for _, d in self._r.hscan_iter(self.k_atime, count=5000)]
            labels = [v for _, v in self._r.hscan_iter(self.k_learned, count=5000)]
            return ntokens, days, labels

        ntokens, days, labels = self._call(gather)
        return StoreStats("redis", self.location, nspam, nham, ntokens,
                          sum(1 for v in labels if v == b"spam"),
                          sum(1 for v in labels if v == b"ham"),
                          min(days) if days else None, max(days) if days else None, None)

    def iter_tokens(self) -> Iterator[tuple[str, int, int, int]]:
        spam = dict(self._call(lambda: list(self._r.hscan_iter(self.k_spam, count=5000))))
        ham = dict(self._call(lambda: list(self._r.hscan_iter(self.k_ham, count=5000))))
        atime = self._call(lambda: list(self._r.hscan_iter(self.k_atime, count=5000)))
        for tok, day in sorted(atime):
            yield tok.decode(), int(spam.get(tok, 0)), int(ham.get(tok, 0)), int(day)

    def iter_learned(self) -> Iterator[tuple[str, str]]:
        rows = self._call(lambda: list(self._r.hscan_iter(self.k_learned, count=5000)))
        for digest, label in sorted(rows):
            yield digest.decode(), label.decode()

    def replace_all(self, nspam: int, nham: int, tokens: Iterable[tuple[str, int, int, int]],
                    learned: Iterable[tuple[str, str]]) -> None:
        def run() -> None:
            pipe = self._r.pipeline(transaction=True)
            pipe.delete(self.k_spam, self.k_ham, self.k_atime, self.k_learned, self.k_counts)
            spam: dict[str, int] = {}
            ham: dict[str, int] = {}
            atime: dict[str, int] = {}
            for tok, s, h, day in tokens:
                if s > 0:
                    spam[tok] = s
                if h > 0:
                    ham[tok] = h
                atime[tok] = day
            for key, mapping in ((self.k_spam, spam), (self.k_ham, ham), (self.k_atime, atime),
                                 (self.k_learned, dict(learned))):
                items = list(mapping.items())
                for i in range(0, len(items), _CHUNK):
                    pipe.hset(key, mapping=dict(items[i:i + _CHUNK]))
            pipe.hset(self.k_counts, mapping={SPAM: nspam, HAM: nham})
            pipe.execute()

        self._call(run)

    def close(self) -> None:
        try:
            self._r.close()
        except Exception:
            pass

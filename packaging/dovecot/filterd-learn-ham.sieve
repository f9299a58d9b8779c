# IMAPSieve: a message was moved OUT of the Junk folder -> learn it as ham (relearning a
# message learned as spam moves it: its spam counts are undone first).
# Moving junk to the Trash is not a verdict, so it is left alone.
require ["vnd.dovecot.pipe", "copy", "imapsieve", "environment", "variables"];

if environment :matches "imap.mailbox" "*" {
  set "mailbox" "${1}";
}
if string "${mailbox}" "Trash" {
  stop;
}
pipe :copy "filterd-learn" ["ham"];

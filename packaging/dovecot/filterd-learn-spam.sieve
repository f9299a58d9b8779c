# IMAPSieve: a message was moved or copied INTO the Junk folder -> learn it as spam.
# Installed as imapsieve_mailbox1_before (see README.md in this directory).
require ["vnd.dovecot.pipe", "copy", "imapsieve"];

pipe :copy "filterd-learn" ["spam"];

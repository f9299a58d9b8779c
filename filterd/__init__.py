"""filterd: a mail content filter for Postfix, replacing amavisd-new."""

__version__ = "0.1.0"

"""Turning a verdict into edits of the message: headers, subject tag (and later DKIM signing)."""

"""Front ends: the thin seams between an MTA protocol and the Scanner.

Only milter.py imports pymilter and only smtp.py imports aiosmtpd; the core knows neither.
"""

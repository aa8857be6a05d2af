"""The DNS response codes this agent answers with, and the query types it counts by name.

Apart from agent/dns_answers.py so that /metrics can name every series from
the first scrape without loading dnspython, which an agent that is scraped
but never asked a name would otherwise carry for nothing.
"""

# RFC 1035 section 4.1.1 (RCODE 0-5) and RFC 6891 section 9 (BADVERS, an extended RCODE
# carried partly in the OPT record).
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, BADVERS = 0, 1, 2, 3, 4, 5, 16
RCODE_NAMES = {NOERROR: "NOERROR", FORMERR: "FORMERR", SERVFAIL: "SERVFAIL", NXDOMAIN: "NXDOMAIN",
               NOTIMP: "NOTIMP", REFUSED: "REFUSED", BADVERS: "BADVERS"}
#: Query types counted by name in /metrics; the rest as "other".
COUNTED_TYPES = ("A", "AAAA", "SRV", "TXT", "SOA", "NS", "ANY", "PTR", "CNAME", "MX", "AXFR", "IXFR")

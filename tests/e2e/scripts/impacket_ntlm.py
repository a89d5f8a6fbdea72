#!/usr/bin/python3
"""NTLM messages made by impacket, for RelayGuard's end-to-end tests.

The Rust test drives the SMTP session; this script only computes messages,
base64 in and out, so every reply is asserted in the test itself:

    impacket_ntlm.py negotiate [--v1]
    impacket_ntlm.py authenticate --negotiate B64 --challenge B64 \
        --domain D --user U --password P [--v1 | --empty-nt]

`--v1` makes impacket compute NTLMv1 (NTLMv1-ESS when the CHALLENGE offers
extended session security). An empty user and password give impacket's
anonymous message (empty NT response, one-byte LM response). `--empty-nt`
keeps the user name but sends no NT response, as an anonymous client would.

Needs Debian's python3-impacket, which only /usr/bin/python3 can import.
"""

import argparse
import base64
import sys

from impacket import ntlm


def negotiate(args):
    msg = ntlm.getNTLMSSPType1(workstation="IMPACKET", use_ntlmv2=not args.v1)
    return msg.getData()


def authenticate(args):
    type1 = ntlm.NTLMAuthNegotiate()
    type1.fromString(base64.b64decode(args.negotiate))
    type3, _exported_session_key = ntlm.getNTLMSSPType3(
        type1,
        base64.b64decode(args.challenge),
        args.user,
        args.password,
        args.domain,
        use_ntlmv2=not args.v1,
    )
    if args.empty_nt:
        type3["ntlm"] = b""
        type3["lanman"] = b"\x00"
    return type3.getData()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    neg = sub.add_parser("negotiate")
    neg.add_argument("--v1", action="store_true")
    auth = sub.add_parser("authenticate")
    auth.add_argument("--negotiate", required=True)
    auth.add_argument("--challenge", required=True)
    auth.add_argument("--domain", default="")
    auth.add_argument("--user", default="")
    auth.add_argument("--password", default="")
    mode = auth.add_mutually_exclusive_group()
    mode.add_argument("--v1", action="store_true")
    mode.add_argument("--empty-nt", action="store_true")
    args = parser.parse_args()
    msg = negotiate(args) if args.command == "negotiate" else authenticate(args)
    sys.stdout.write(base64.b64encode(msg).decode("ascii") + "\n")


if __name__ == "__main__":
    main()

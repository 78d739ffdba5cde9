#!/usr/bin/env python3
"""Send one sd_notify datagram, as any process could: `send_notify.py SOCKET 'READY=1' [--with-fd]`.

The tests use it to play a stray sender (a process that is not a worker), and
--with-fd attaches an unrequested SCM_RIGHTS descriptor (an open temporary
file) that the receiver must close. SOCKET is a path, or @name for an
abstract socket. Exit status 0 when the datagram was sent, 1 otherwise.
"""

import argparse
import array
import array
import socket
import sys
import tempfile


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("socket", help="NOTIFY_SOCKET value: a path or @abstract")
    p.add_argument("message", help="the payload, e.g. 'READY=1' (newlines separate fields)")
    p.add_argument("--with-fd", action="store_true", help="attach an open file's fd with SCM_RIGHTS")
    args = p.parse_args()
    address = "\0" + args.socket[1:] if args.socket.startswith("@") else args.socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            if args.with_fd:
                with tempfile.TemporaryFile() as f:
                    sock.sendmsg(
                        [args.message.encode()],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [f.fileno()]))],
                        0,
                        address,
                    )
            else:
                sock.sendto(args.message.encode(), address)
    except OSError as exc:
        print(f"send_notify: {args.socket}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

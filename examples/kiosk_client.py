#!/usr/bin/env python3
"""Host-side client for `graft serve` with pyserial (pip install pyserial==3.5).

    python3 examples/kiosk_client.py /dev/ttyUSB0 PING "LEARN cup 5" CLASSIFY
    python3 examples/kiosk_client.py socket://127.0.0.1:7070 INFO

Each request gets exactly one reply line (OK ... / ERR <code> ...); EVT lines may come between.
Requests are sent with an id and checksum, and replies are checked against both.
"""
import sys
from functools import reduce

import serial  # pyserial


def checksum(text):
    return "%02X" % reduce(lambda a, c: a ^ c, text.encode(), 0)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    port = serial.serial_for_url(sys.argv[1], baudrate=115200, timeout=60)
    for n, request in enumerate(sys.argv[2:]):
        body = "#%d %s" % (n, request)
        port.write(("%s*%s\n" % (body, checksum(body))).encode())
        while True:
            line = port.readline().decode("utf-8", "replace").rstrip("\r\n")
            if not line:
                sys.exit("no reply to %r" % request)
            if line.startswith("EVT"):
                print(line)
                continue
            text, _, sent = line.rpartition("*")
            if checksum(text) != sent:
                sys.exit("bad checksum on %r" % line)
            word, _, rest = text.partition(" ")
            if word == "ERR":
                code, _, rest = rest.partition(" ")
            assert rest.startswith("#%d" % n), line
            print("> %s\n< %s" % (request, text))
            break


if __name__ == "__main__":
    main()

"""Unit tests of the bootstrap's pure parts (src/classes/bootstrap.py), run
by tests/bootstrap_units.rs with the test venv's Python:

    .venv/bin/python -m unittest -v test_bootstrap   (in tests/py)

The bootstrap is a script that runs main() as it is loaded; here its text
is executed without that last call, so its functions can be called alone.
What they are fed stands for a master that misbehaves: a spawn request
whose descriptors do not match what it says, more descriptors than the
zygote takes, a message too long. Each must be refused with no descriptor
left open.
"""

import array
import os
import socket
import types
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "..", "..", "src", "classes", "bootstrap.py")


def load_bootstrap():
    with open(SOURCE) as f:
        text = f.read()
    body, call = text.rsplit("\nmain()", 1)
    assert call.strip() == "", "bootstrap.py ends with its main() call"
    module = types.ModuleType("procman_bootstrap")
    module.__file__ = SOURCE
    exec(compile(body, SOURCE, "exec"), module.__dict__)
    return module


B = load_bootstrap()


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def spawn(**request):
    return {"spawn": {"slot": 0, "generation": 1, "env": {}, **request}}


class ParseSpawn(unittest.TestCase):
    def test_a_plain_request_without_sockets(self):
        self.assertEqual(B.parse_spawn(spawn(), 0, 1), (0, 1, {}, []))

    def test_a_reuse_port_request_names_the_listener_of_each_descriptor(self):
        got = B.parse_spawn(spawn(slot=2, env={"A": "b"}, sockets=[1, 0]), 2, 2)
        self.assertEqual(got, (2, 1, {"A": "b"}, [1, 0]))

    def test_sockets_that_do_not_match_the_descriptors_are_refused(self):
        cases = [
            ([0], 0, 1, "more names than descriptors"),
            ([], 1, 1, "a descriptor no name places"),
            ([0], 2, 2, "fewer names than descriptors"),
            ([0, 0], 2, 2, "one listener twice"),
            ([1], 1, 1, "a listener the zygote does not have"),
            ([-1], 1, 1, "a negative listener"),
            ([True], 1, 2, "a boolean for a listener"),
            (["0"], 1, 1, "a string for a listener"),
            ({"0": 0}, 1, 1, "not a list"),
        ]
        for places, passed, listeners, what in cases:
            with self.subTest(what), self.assertRaisesRegex(ValueError, "sockets"):
                B.parse_spawn(spawn(sockets=places), passed, listeners)

    def test_other_malformed_requests_are_refused(self):
        cases = [
            ({"spawn": {}, "x": 1}, "another key beside spawn"),
            ({"spawn": []}, "spawn not an object"),
            (spawn(slot=-1), "a negative slot"),
            (spawn(generation="1"), "a string generation"),
            (spawn(env={"A=B": "c"}), "a variable name with ="),
            (spawn(env={"A": "c\0d"}), "a NUL in a value"),
            (spawn(env=["A"]), "env not an object"),
            (spawn(extra=1), "an unknown key"),
        ]
        for message, what in cases:
            with self.subTest(what), self.assertRaises(ValueError):
                B.parse_spawn(message, 0, 1)


class Receive(unittest.TestCase):
    """ControlChannel.receive: at most max_fds descriptors taken, none kept
    from a message it refuses."""

    def setUp(self):
        self.master, zygote = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.channel = B.ControlChannel(zygote)
        self.addCleanup(self.master.close)
        self.addCleanup(zygote.close)

    def send(self, data, fds):
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.master.sendmsg([data], ancillary)

    def pipes(self, n):
        ends = []
        for _ in range(n):
            r, w = os.pipe()
            ends += [r, w]
        for fd in ends:
            self.addCleanup(os.close, fd)
        return ends[::2]

    def test_descriptors_up_to_the_limit_are_taken_close_on_exec(self):
        sent = self.pipes(2)
        before = open_fds()
        self.send(b'{"spawn":{}}', sent)
        data, fds = self.channel.receive(max_fds=2)
        self.assertEqual((data, len(fds)), (b'{"spawn":{}}', 2))
        for fd, original in zip(fds, sent):
            self.assertFalse(os.get_inheritable(fd))
            self.assertEqual(os.fstat(fd).st_ino, os.fstat(original).st_ino)
            os.close(fd)
        self.assertEqual(open_fds(), before)

    def check_refused(self, data, passed, max_fds, reason):
        """`data` sent with `passed` descriptors, read taking at most
        `max_fds`: refused for `reason`, nothing left open."""
        sent = self.pipes(passed)
        before = open_fds()
        self.send(data, sent)
        with self.assertRaisesRegex(ValueError, reason):
            self.channel.receive(max_fds=max_fds)
        self.assertEqual(open_fds(), before)

    def test_more_descriptors_than_the_limit_are_refused_and_none_kept(self):
        self.check_refused(b'{"spawn":{}}', 3, 1, "more than 1 descriptors")

    def test_descriptors_when_none_are_taken_are_refused_and_none_kept(self):
        self.check_refused(b'{"spawn":{}}', 1, 0, "more than 0 descriptors")

    def test_a_message_too_long_is_refused_and_its_descriptors_closed(self):
        self.check_refused(b"x" * (B.MAX_MESSAGE + 1), 1, 1, "longer than")

    def test_the_master_gone_reads_as_the_end(self):
        self.master.close()
        self.assertEqual(self.channel.receive(max_fds=1), (None, []))


if __name__ == "__main__":
    unittest.main()

"""The benchmark's Serf RPC reader: msgpack objects split across reads, in Serf's old-spec raws."""
from __future__ import annotations

import socket
import threading

import msgpack
import pytest

from simulations.bench_cluster import MpReader, mp_pack


def test_objects_split_across_reads_arrive_whole_and_in_order() -> None:
    a, b = socket.socketpair()
    # Old spec: str8 does not exist there, so strings are fixstr/str16/str32 raws, as
    # go-msgpack sends them; a member's Addr is 4 raw bytes that are not UTF-8.
    header = {"Seq": 7, "Error": ""}
    body = {"Members": [{"Name": f"node{i:02d}", "Addr": bytes([127, 0, 0, 1 + i]), "Status": "alive",
                         "Tags": {"role": "x" * 40}} for i in range(50)]}
    data = msgpack.packb(header, use_bin_type=False) + msgpack.packb(body, use_bin_type=False)

    def send_slowly() -> None:
        for i in range(0, len(data), 7):
            a.sendall(data[i:i + 7])
        a.close()

    t = threading.Thread(target=send_slowly)
    t.start()
    reader = MpReader(b)
    assert reader.unpack() == header
    got = reader.unpack()
    t.join()
    assert [m["Name"] for m in got["Members"]] == [f"node{i:02d}" for i in range(50)]
    addr = got["Members"][49]["Addr"]
    assert addr.encode("utf-8", "surrogateescape") == bytes([127, 0, 0, 50])
    with pytest.raises(ConnectionError):
        reader.unpack()
    b.close()


def test_what_we_send_is_msgpack() -> None:
    req = {"Command": "join", "Seq": 3}
    body = {"Existing": ["127.0.0.1:7946"], "Replay": False, "Big": 1 << 40, "Neg": -5}
    assert msgpack.unpackb(mp_pack(req), raw=False) == req
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(mp_pack(req) + mp_pack(body))
    assert list(unpacker) == [req, body]
    # go-msgpack's old spec has no str8: a 40-byte string goes as str16.
    assert mp_pack("x" * 40)[:3] == b"\xda\x00\x28"

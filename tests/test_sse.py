"""The SSE decoder against the WHATWG rules, fed with chunks cut anywhere, and stream translation."""

from __future__ import annotations

import asyncio

import pytest

from dspy_anyscale._sse import ServerSentEvent, SSEDecoder, aiter_sse, iter_sse


def decode(*chunks: bytes) -> list[ServerSentEvent]:
    return list(iter_sse(chunks))


def every_split(data: bytes):
    """The same bytes cut at every possible position, and byte by byte."""
    yield [data]
    for cut in range(1, len(data)):
        yield [data[:cut], data[cut:]]
    yield [data[i : i + 1] for i in range(len(data))]


STREAM = (
    b'data: {"a": 1}\n\n: keep-alive comment\r\n\r\ndata: line one\r\ndata: line two\r\n\r\nevent: ping\rdata: x\r\r'
)


@pytest.mark.parametrize("chunks", list(every_split(STREAM)))
def test_any_chunking_gives_the_same_events(chunks):
    assert decode(*chunks) == [
        ServerSentEvent('{"a": 1}'),
        ServerSentEvent("line one\nline two"),
        ServerSentEvent("x", event="ping"),
    ]


def test_utf8_characters_cut_between_chunks_survive():
    data = "data: héllo 🚀 wörld\n\n".encode()
    for chunks in every_split(data):
        assert decode(*chunks) == [ServerSentEvent("héllo 🚀 wörld")]


def test_field_rules():
    events = decode(b"data:no-space\n\ndata:  two-spaces\n\ndata\n\nid: 7\nretry: 1500\ndata: x\n\nfoo: bar\n\n")
    assert [e.data for e in events] == ["no-space", " two-spaces", "", "x"]
    assert (events[3].id, events[3].retry) == ("7", 1500)


def test_an_event_without_data_is_not_dispatched_and_a_trailing_partial_event_is_discarded():
    assert decode(b"event: nothing\n\n", b"data: unfinished") == []


def test_crlf_split_across_chunks_is_one_line_end():
    assert decode(b"data: a\r", b"\n\r\ndata: b\r\n\r\n") == [ServerSentEvent("a"), ServerSentEvent("b")]


def test_a_final_cr_ends_a_line_at_end_of_stream():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == []  # the second CR may be half of a CRLF
    assert decoder.close() == [ServerSentEvent("a")]


def test_async_decoder():
    async def source():
        for chunk in (b"data: 1\n", b"\ndata: 2\n\n"):
            yield chunk

    async def collect():
        return [e.data async for e in aiter_sse(source())]

    assert asyncio.run(collect()) == ["1", "2"]


def _decode_seconds(data: bytes, chunk_size: int) -> float:
    import time

    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    decoder = SSEDecoder()
    started = time.perf_counter()
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    elapsed = time.perf_counter() - started
    assert len(events) == 1 and len(events[0].data) == len(data) - len(b"data: \n\n")
    return elapsed


def test_decoding_one_large_event_is_linear_in_its_size():
    # One event 8x larger, fed in the transport's 64 KiB reads, must take about 8x as long, not 64x
    # (a decoder that re-joins and re-scans its buffer per chunk is quadratic: 20 MB took 5 s).
    # Compared within this test, best of a few rounds each, so a noisy machine cannot decide it.
    small, large = (b"data: " + b"x" * size + b"\n\n" for size in (1 << 20, 8 << 20))
    best_small = best_large = float("inf")
    for _ in range(3):
        best_small = min(best_small, _decode_seconds(small, 65536))
        best_large = min(best_large, _decode_seconds(large, 65536))
        if best_large < 20 * best_small:
            return
    pytest.fail(f"8x the bytes took {best_large / best_small:.0f}x the time: decoding is not linear")


def test_a_long_line_cut_anywhere_keeps_its_pieces_in_order():
    line = "".join(chr(0x41 + i % 26) for i in range(5000)) + "é🚀"
    data = f"data: {line}\r\ndata: tail\r\n\r\n".encode()
    for size in (1, 3, 7, 64, 4096):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        assert decode(*chunks) == [ServerSentEvent(f"{line}\ntail")]
    decoder = SSEDecoder()
    decoder.feed(data[:100])
    assert decoder.pending == "data: " + line[:94]

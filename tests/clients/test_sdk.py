"""The SDK's client loop: duplicates dropped, gaps filled from the result stream, restart
honoured, errors named, abort on early exit, timeouts. Where the test is about the loop the
test plays the worker (it reads the request and publishes hand-made events); elsewhere a
service on the fake engine answers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import pytest
import redis.asyncio as aioredis

from broker import producer
from broker.embedded import RedisServer
from broker.protocol import (
    AbortRequest,
    Codec,
    ErrorEvent,
    Event,
    GenerateRequest,
    TokenEvent,
    encode_event,
)
from clients import (
    AdapterUnavailable,
    AsyncClient,
    Client,
    InvalidRequestError,
    RequestExpired,
    RequestTimeout,
)
from clients.gateway import api_error
from tests.broker.conftest import PREFIX, eventually, fake_engine, running_service
from tests.broker.fake_engine import FakeTokenizer, expected_tokens

pytestmark = pytest.mark.anyio


@pytest.fixture
async def sdk(client: aioredis.Redis) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(redis=client, prefix=PREFIX, timeout_s=10) as c:
        yield c


class HandWorker:
    """Plays a worker: takes the next request off the stream, publishes chosen events."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.last_entry = "0"

    async def next_request(self) -> GenerateRequest:
        with anyio.fail_after(5):
            while True:
                got = await self.client.xread({f"{PREFIX}:requests": self.last_entry}, block=100)
                if got:
                    entry_id, fields = got[0][1][0]
                    self.last_entry = entry_id
                    return GenerateRequest.from_wire(Codec.unpack(fields[b"data"]), prefix=PREFIX)

    async def store(self, request_id: str, *events: Event) -> None:
        for e in events:
            await self.client.xadd(f"{PREFIX}:out:{request_id}", {"data": encode_event(e)})

    async def publish(self, req: GenerateRequest, *events: Event) -> None:
        for e in events:
            await self.client.publish(req.reply_to, encode_event(e))


def ev(rid: str, seq: int, text: str, *, final: bool = False, restart: bool = False) -> TokenEvent:
    return TokenEvent(
        id=rid,
        seq=seq,
        token_ids=[seq],
        text=text,
        finished=final,
        finish_reason="stop" if final else None,
        usage={"prompt_tokens": 3, "completion_tokens": seq + 1} if final else None,
        restart=restart,
    )


async def test_duplicates_dropped_and_gap_filled_from_result_stream(
    client: aioredis.Redis, sdk: AsyncClient
) -> None:
    worker = HandWorker(client)
    seqs: list[int] = []

    async def play() -> None:
        req = await worker.next_request()
        events = [ev(req.id, i, "abcde"[i], final=i == 4) for i in range(5)]
        await worker.store(req.id, *events)
        # seq 1 sent twice, 2 and 3 lost on the channel (the result stream has them).
        await worker.publish(req, events[0], events[1], events[1], events[0], events[4])

    async with anyio.create_task_group() as tg:
        tg.start_soon(play)
        stream = sdk.generate("hi", max_tokens=5)
        async with stream:
            seqs = [e.seq async for e in stream]
    assert seqs == [0, 1, 2, 3, 4]
    assert stream.text == "abcde"
    assert stream.finish_reason == "stop"
    assert stream.usage["completion_tokens"] == 5


async def test_restart_marker_clears_what_was_received(
    client: aioredis.Redis, sdk: AsyncClient
) -> None:
    worker = HandWorker(client)

    async def play() -> None:
        req = await worker.next_request()
        # No result streams: the new run starts from seq 0 again with restart set.
        await worker.publish(req, ev(req.id, 0, "x"), ev(req.id, 1, "y"))
        await worker.publish(req, ev(req.id, 0, "a", restart=True), ev(req.id, 1, "b", final=True))

    async with anyio.create_task_group() as tg:
        tg.start_soon(play)
        done = await sdk.complete("hi")
    assert done.text == "ab"
    assert done.token_ids == [0, 1]


async def test_error_event_raises_named_exception_with_code(
    client: aioredis.Redis, sdk: AsyncClient
) -> None:
    worker = HandWorker(client)

    async def play() -> None:
        req = await worker.next_request()
        await worker.publish(req, ErrorEvent(req.id, 0, "adapter_not_found", "no adapter 'zz'"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(play)
        with pytest.raises(AdapterUnavailable) as info:
            await sdk.complete("hi", adapter="zz")
    assert info.value.code == "adapter_not_found"
    assert "zz" in str(info.value)


async def test_no_worker_times_out_and_aborts(client: aioredis.Redis, sdk: AsyncClient) -> None:
    control = client.pubsub(ignore_subscribe_messages=True)
    await control.subscribe(f"{PREFIX}:control")
    with pytest.raises(RequestTimeout) as info:
        await sdk.complete("hi", timeout_s=0.3)
    assert not info.value.started
    with anyio.fail_after(5):
        while (msg := await control.get_message(timeout=1)) is None:
            pass
    assert AbortRequest.from_wire(Codec.unpack(msg["data"])).id == info.value.request_id
    await control.aclose()


async def test_whole_text_and_usage_from_a_worker(
    redis_server: RedisServer, sdk: AsyncClient
) -> None:
    async with running_service(redis_server.url):
        done = await sdk.complete("hello", max_tokens=7)
    tok = FakeTokenizer()
    expected = expected_tokens(tok.encode("hello"), 7)
    assert done.token_ids == expected
    assert done.text == tok.decode(expected)
    assert done.finish_reason == "length"
    assert done.usage["completion_tokens"] == 7


async def test_bad_parameter_raises_invalid_request(
    redis_server: RedisServer, sdk: AsyncClient
) -> None:
    async with running_service(redis_server.url):
        with pytest.raises(InvalidRequestError) as info:
            await sdk.complete("hello", temperature=-1)
    assert info.value.code == "invalid_sampling_params"


@pytest.mark.parametrize("how", ["async with", "bare break"])
async def test_leaving_the_iterator_aborts_the_request(
    redis_server: RedisServer, sdk: AsyncClient, how: str
) -> None:
    engine = fake_engine(step_delay_s=0.02)
    async with running_service(redis_server.url, engine=engine):
        stream = sdk.generate("hello", max_tokens=200)
        if how == "async with":
            async with stream:
                async for event in stream:
                    if event.seq == 2:
                        break
        else:
            async for event in stream:
                if event.seq == 2:
                    break
            del stream  # the loop's async-generator finalizer closes it
        await eventually(lambda: len(engine.aborted) == 1, timeout_s=5)


def test_sync_client_streams_and_aborts(redis_server: RedisServer) -> None:
    engine = fake_engine(step_delay_s=0.01)

    async def serve(ready: anyio.Event, stop: anyio.Event) -> None:
        async with running_service(redis_server.url, engine=engine):
            ready.set()
            await stop.wait()

    with anyio.from_thread.start_blocking_portal(backend="asyncio") as portal:
        ready, stop = portal.call(anyio.Event), portal.call(anyio.Event)
        future = portal.start_task_soon(serve, ready, stop)
        portal.call(ready.wait)
        with Client(redis_server.url, prefix=PREFIX, timeout_s=10) as c:
            done = c.complete("hey", max_tokens=4)
            assert len(done.token_ids) == 4
            for event in c.generate("hey", max_tokens=200):
                if event.seq == 1:
                    break
            portal.call(lambda: eventually(lambda: len(engine.aborted) == 1, timeout_s=5))
        portal.call(stop.set)
        future.result(timeout=10)


async def test_concurrent_requests_share_one_reply_subscription(
    redis_server: RedisServer, client: aioredis.Redis, sdk: AsyncClient
) -> None:
    """Twenty streams at once through one client: one channel on the server, one pub/sub
    connection, and each stream gets exactly its own tokens."""
    engine = fake_engine(step_delay_s=0.02)
    tok = FakeTokenizer()
    seen_channels: list[int] = []
    pubsub_clients: list[int] = []

    async with running_service(redis_server.url, engine=engine):
        before = sum("P" in c["flags"] for c in await client.client_list())
        results: dict[int, list[int]] = {}

        async def one(i: int) -> None:
            done = await sdk.complete(f"prompt {i}", max_tokens=12)
            results[i] = done.token_ids

        async def watch() -> None:
            while len(results) < 20:
                seen_channels.append(len(await client.pubsub_channels(f"{PREFIX}:tokens:*")))
                clients = await client.client_list()
                pubsub_clients.append(sum("P" in c["flags"] for c in clients) - before)
                await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i)
            tg.start_soon(watch)
    assert max(seen_channels) == 1
    assert max(pubsub_clients) == 1
    for i in range(20):
        assert results[i] == expected_tokens(tok.encode(f"prompt {i}"), 12)


async def test_a_lost_reply_connection_is_made_up_from_the_result_stream(
    client: aioredis.Redis, sdk: AsyncClient
) -> None:
    """The reply connection is killed after the first event, and the rest (the final one
    included) is published while it is down: the stream still ends, complete and in order."""
    worker = HandWorker(client)
    first_seen = anyio.Event()

    async def play() -> None:
        req = await worker.next_request()
        events = [ev(req.id, i, "abcde"[i], final=i == 4) for i in range(5)]
        await worker.store(req.id, *events)
        await worker.publish(req, events[0])
        await first_seen.wait()
        await client.client_kill_filter(_type="pubsub")
        await worker.publish(req, *events[1:])

    got: list[TokenEvent] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(play)
        with anyio.fail_after(8):
            async for event in sdk.generate("hi", timeout_s=6):
                got.append(event)
                first_seen.set()
    assert [e.seq for e in got] == [0, 1, 2, 3, 4]
    assert "".join(e.text for e in got) == "abcde"


async def test_requests_carry_a_deadline_from_their_timeout(
    client: aioredis.Redis, sdk: AsyncClient
) -> None:
    before = time.time()
    with pytest.raises(RequestTimeout):
        await sdk.complete("hi", timeout_s=0.5)
    after = time.time()
    [(_, fields)] = await client.xrange(f"{PREFIX}:requests")
    wire = Codec.unpack(fields[b"data"])
    assert (before + 0.5) * 1000 <= wire["deadline"] <= (after + 0.5) * 1000


async def test_no_worker_is_reported_once_and_the_request_waits_its_timeout(
    client: aioredis.Redis,
) -> None:
    said: list[str] = []
    async with AsyncClient(
        redis=client, prefix=PREFIX, no_worker_after_s=0.2, on_no_worker=said.append
    ) as sdk:
        start = anyio.current_time()
        with pytest.raises(RequestTimeout) as info:
            await sdk.complete("hi", timeout_s=1.5)
        waited = anyio.current_time() - start
    assert waited >= 1.5  # told, and still waited for its whole timeout
    assert not info.value.started
    assert len(said) == 1
    assert f"no worker is consuming {PREFIX}:requests" in said[0]
    assert info.value.request_id in said[0]


async def test_no_warning_while_a_worker_consumes(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    """The worker is slow to answer (its first step takes longer than the check), but it
    reads the stream: nothing is reported."""
    said: list[str] = []
    async with (
        running_service(redis_server.url, engine=fake_engine(step_delay_s=0.6)),
        AsyncClient(
            redis=client, prefix=PREFIX, no_worker_after_s=0.1, on_no_worker=said.append
        ) as sdk,
    ):
        done = await sdk.complete("hi", max_tokens=1)
    assert len(done.token_ids) == 1
    assert said == []


async def test_events_of_other_requests_on_the_channel_are_dropped(
    redis_server: RedisServer, client: aioredis.Redis, sdk: AsyncClient
) -> None:
    """A producer sends request B with reply_to = the channel of an SDK request A, and
    garbage is published there too: A's stream holds exactly A's tokens, nothing else."""
    tok = FakeTokenizer()
    engine = fake_engine(step_delay_s=0.02)
    async with running_service(redis_server.url, engine=engine):
        stream = sdk.generate("request a", max_tokens=30)
        async with stream:
            async for event in stream:
                if event.seq == 0:
                    [(_, fields)] = await client.xrange(f"{PREFIX}:requests")
                    channel = Codec.unpack(fields[b"data"])["reply_to"]
                    await producer.submit(
                        client, PREFIX,
                        {"id": "b", "prompt": "request b", "reply_to": channel, "params": {"max_tokens": 2}},
                    )  # fmt: skip
                    for junk in (
                        b"\x00junk",
                        Codec.pack(
                            {
                                "v": 1,
                                "id": [1],
                                "seq": 0,
                                "token_ids": [],
                                "text": "",
                                "finished": True,
                            }
                        ),
                    ):
                        await client.publish(channel, junk)
        b_events = [e async for e in producer.events(client, PREFIX, "b", timeout_s=10)]
    assert stream.token_ids == expected_tokens(tok.encode("request a"), 30)
    assert stream.finish_reason == "length"
    assert b_events[-1].finished  # B ran, and its events did reach that channel


async def test_producer_events_take_only_their_own_request(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    tok = FakeTokenizer()
    async with running_service(redis_server.url, engine=fake_engine(step_delay_s=0.02)):
        channel = f"{PREFIX}:tokens:a"
        got: list[Event] = []
        async with anyio.create_task_group() as tg:

            async def follow_a() -> None:
                async for event in producer.events(client, PREFIX, "a", timeout_s=20):
                    got.append(event)

            tg.start_soon(follow_a)
            await producer.submit(
                client, PREFIX, {"id": "a", "prompt": "request a", "params": {"max_tokens": 30}}
            )
            await eventually(lambda: len(got) > 0)
            await producer.submit(
                client,
                PREFIX,
                {
                    "id": "b",
                    "prompt": "request b",
                    "reply_to": channel,
                    "params": {"max_tokens": 2},
                },
            )
            await client.publish(channel, b"\xc1 not msgpack")
    ids, _ = producer.assemble(got)
    assert ids == expected_tokens(tok.encode("request a"), 30)
    assert {e.id for e in got} == {"a"}
    assert [e.seq for e in got] == list(range(len(got)))


async def test_an_expired_request_raises_request_expired(
    client: aioredis.Redis, sdk: AsyncClient
) -> None:
    worker = HandWorker(client)

    async def play() -> None:
        req = await worker.next_request()
        await worker.publish(req, ErrorEvent(req.id, 0, "expired", "the deadline passed"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(play)
        with pytest.raises(RequestExpired) as info:
            await sdk.complete("hi")
    assert isinstance(info.value, TimeoutError)
    assert info.value.code == "expired"
    assert api_error(info.value).status == 504  # what the gateway answers

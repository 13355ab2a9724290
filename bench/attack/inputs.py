"""Attacks with hostile inputs: huge texts, heads and bodies, out-of-range numbers, bad text, and
OpenAI fields whose streamed and unstreamed answers must agree."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlparse

import httpx

from bench.attack.lab import Result, counts, error_message, ms, timed
from bench.server import HOST

# ---- attacks: inputs ---------------------------------------------------------------------------


@contextlib.contextmanager
def polled_health(
    url: str, every_s: float = 0.1, settle_s: float = 0.3, sent: list[float] | None = None
) -> Iterator[list[float]]:
    """GET /health every `every_s` on a thread while the block runs (after `settle_s` of it
    first); yields the list its latencies (s) are appended to. `sent`, when given, gets each
    probe's time.perf_counter() at sending, in the same order."""
    health: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=30) as c:
            while not done.is_set():
                if sent is not None:
                    sent.append(time.perf_counter())
                health.append(timed(lambda: c.get(f"{url}/health"))[1])
                done.wait(every_s)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    time.sleep(settle_s)
    try:
        yield health
    finally:
        done.set()
        poller.join(timeout=35)


def tokenize_bomb(url: str, chars: int = 1_000_000) -> Result:
    """A ~1 MB text is refused at once by /tokenize and /generate, and /health stays fast meanwhile."""
    text = "a " * (chars // 2)
    with polled_health(url) as health:
        t0 = time.perf_counter()
        with httpx.stream("POST", f"{url}/tokenize", json={"inputs": text}, timeout=120) as r:
            tok_status, tok_bytes = r.status_code, sum(len(b) for b in r.iter_bytes())
        tok_s = time.perf_counter() - t0
        gen = [timed(lambda: httpx.post(f"{url}/generate", json={"inputs": text}, timeout=60)) for _ in range(2)]
        gen_status, gen_s = min(gen, key=lambda g: g[1])
    worst = max(health, default=float("inf"))
    return Result(
        "tokenize-bomb",
        f"POST /tokenize and /generate with a {chars / 1e6:.0f} MB text; /health polled every 100 ms",
        f"/tokenize {tok_status} ({tok_bytes / 1e6:.1f} MB body, {tok_s:.2f} s); /generate {gen_status} in "
        f"{ms(gen_s)}; /health max {ms(worst)} over {len(health)} polls",
        tok_status == 200 or worst > 1.0 or gen_status != 422 or gen_s >= 0.2,
        {"tokenize_status": tok_status, "generate_status": gen_status, "generate_s": gen_s, "health_max_s": worst},
    )


def huge_header(url: str, megabytes: int = 64) -> Result:
    """A request head of many megabytes (one header, sent as fast as loopback takes it) is cut
    off at the limit, and /health stays fast meanwhile; the parser's appends once made it
    seconds of event-loop time."""
    host, port = urlparse(url).hostname or HOST, urlparse(url).port or 80
    with polled_health(url) as health:
        t0 = time.perf_counter()
        with socket.create_connection((host, port), timeout=60) as s:
            reply = b""
            try:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
                chunk = b"a" * (1 << 20)
                for _ in range(megabytes):
                    s.sendall(chunk)
                s.sendall(b"\r\n\r\n")
            except OSError:
                pass  # closed before the whole head went out: what it answered is read below
            with contextlib.suppress(OSError):
                reply = s.recv(200)
        took = time.perf_counter() - t0
        time.sleep(0.3)
    status = int(reply.split(b" ")[1]) if reply.startswith(b"HTTP/1.1 ") else 0
    worst = max(health, default=float("inf"))
    return Result(
        "huge-header",
        f"a request with a {megabytes} MB header over one connection; /health polled every 100 ms",
        f"{status or 'no reply'} after {took:.2f} s; /health max {ms(worst)} over {len(health)} polls",
        status != 431 or worst > 1.0,
        {"status": status, "reply_s": took, "health_max_s": worst},
    )


async def _with_bad_neighbour(url: str, bad: Mapping[str, Any], good: int) -> tuple[int, list[int]]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        params = {"max_new_tokens": 20}
        calls = [http.post("/generate", json={"inputs": "JULIET:", "parameters": {**params, **bad}})]
        calls += [http.post("/generate", json={"inputs": f"ROMEO {i}:", "parameters": params}) for i in range(good)]
        responses = await asyncio.gather(*calls)
    return responses[0].status_code, [r.status_code for r in responses[1:]]


def top_k_overflow(url: str, good: int = 10) -> Result:
    """Out-of-range sampling numbers are refused (422) and never fail the requests that share their batch."""
    cases: dict[str, dict[str, Any]] = {
        "top_k=2^63": {"top_k": 2**63, "do_sample": True},
        "temperature=1e308": {"temperature": 1e308, "do_sample": True},
    }
    parts, defect, details = [], False, {}
    for label, bad in cases.items():
        bad_status, goods = asyncio.run(_with_bad_neighbour(url, bad, good))
        failed = sum(s != 200 for s in goods)
        defect = defect or bad_status != 422 or failed > 0
        parts.append(f"{label}: bad {bad_status}, good {counts(goods)}")
        details[label] = {"bad": bad_status, "good": goods}
    return Result(
        "top-k-overflow",
        f"{good} greedy /generate requests concurrent with one out-of-range sampling request",
        "; ".join(parts),
        defect,
        details,
    )


def lone_surrogate(url: str) -> Result:
    """A lone UTF-16 surrogate (the JSON escape \\ud800) in any text field is a 422 that names the field
    (on /v1, OpenAI's 400 invalid_request_error)."""
    s = "\\ud800"  # in the JSON text, not a Python surrogate: json.loads turns it into one server-side
    cases = [
        ("/predict", "inputs", f'{{"inputs": "{s}"}}'),
        ("/tokenize", "inputs", f'{{"inputs": "{s}"}}'),
        ("/generate", "inputs", f'{{"inputs": "{s}", "parameters": {{"max_new_tokens": 4}}}}'),
        ("/v1/completions", "prompt", f'{{"prompt": "{s}", "max_tokens": 4}}'),
        ("/v1/completions", "model", f'{{"prompt": "ROMEO:", "model": "{s}", "max_tokens": 4}}'),
        # as a key: the message names it escaped (the raw key could not be encoded into it)
        ("/generate", f"parameters.{s}", f'{{"inputs": "ROMEO:", "parameters": {{"{s}": 1}}}}'),
        ("/v1/completions", f"logit_bias.{s}", f'{{"prompt": "ROMEO:", "logit_bias": {{"{s}": 1}}}}'),
    ]
    # in lists nested as deep as json.loads takes (where it gives up depends on the stack)
    cases += [
        ("/generate", "parameters.stop.0.0", '{"inputs": "ROMEO:", "parameters": {"stop": ' + nest(s, depth) + "}}")
        for depth in range(1000, 900, -4)
    ]
    parts, codes, defect = [], Counter[str](), False
    for path, fld, body in cases:
        r = httpx.post(url + path, content=body.encode(), headers={"content-type": "application/json"}, timeout=30)
        message = error_message(r)
        named = fld in message
        nested = fld.startswith("parameters.stop")
        if nested:  # past json.loads' depth: malformed, which is right too
            codes[f"{r.status_code}" + (" named" if named else "")] += 1
            named = named or message == "malformed JSON body"
        defect = defect or r.status_code != (400 if path.startswith("/v1/") else 422) or not named
        if not nested:
            unnamed = "" if named or r.status_code == 200 else " (field not named)"
            parts.append(f"{path} {fld}: {r.status_code}{unnamed}")
    parts.append("nested 904-1000 deep: " + ", ".join(f"{code}×{n}" for code, n in sorted(codes.items())))
    what = 'JSON "\\ud800" in each text field, as a key, and nested deep'
    return Result("lone-surrogate", what, "; ".join(parts), defect)


def nest(text: str, depth: int) -> str:
    """A JSON string in lists nested depth deep."""
    return "[" * depth + f'"{text}"' + "]" * depth


def _bodies_beside_health(
    url: str, path: str, body: bytes, clients: int, bodies: int
) -> tuple[list[tuple[int, float]], float, list[float], int]:
    """`clients` threads each POST `body` to `path` `bodies` times, one after another, while
    /health is polled: (status, seconds) per reply, the whole run's seconds, the /health
    latencies during it (inf if none came), and how many polls there were."""
    replies: list[tuple[int, float]] = []

    def client() -> None:
        with httpx.Client(timeout=60, headers={"content-type": "application/json"}) as c:
            for _ in range(bodies):
                replies.append(timed(lambda: c.post(f"{url}{path}", content=body)))

    with polled_health(url) as health:
        first = len(health)  # the polls before this are of an idle server
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        took = time.perf_counter() - t0
    return replies, took, health[first:] or [float("inf")], len(health) - first


def _body_result(
    name: str, what: str, replies: list[tuple[int, float]], took: float, during: list[float], polls: int, defect: bool
) -> Result:
    p50, worst = statistics.median(during), max(during)
    slowest = max((s for _, s in replies), default=float("inf"))
    return Result(
        name,
        what,
        f"{counts([st for st, _ in replies])} in {took:.2f} s (slowest reply {ms(slowest)}); /health median "
        f"{ms(p50)}, max {ms(worst)} over {polls} polls",
        defect,
        {
            "statuses": dict(Counter(st for st, _ in replies)),
            "seconds": took,
            "health_p50_s": p50,
            "health_max_s": worst,
        },
    )


def token_id_body(url: str, ids: int = 499_000, clients: int = 2, bodies: int = 4) -> Result:
    """Bodies of ~1 MB of token ids (past the context: 422) are refused quickly and /health stays fast
    meanwhile: the lone-surrogate check once named a path per id, holding the event loop ~1 s per body."""
    body = json.dumps({"input_ids": [1] * ids}, separators=(",", ":")).encode()  # 2 bytes an id: under 1 MiB
    replies, took, during, polls = _bodies_beside_health(url, "/predict", body, clients, bodies)
    what = (
        f"{clients} clients each sending {bodies} /predict bodies of {ids:,} token ids ({len(body) / 1e6:.2f} MB) "
        "one after another; /health polled every 100 ms"
    )
    # 2026-12-03, 2-core host: median 632 and 880 ms on 56c4fbf (before the fix), 70 and 47 ms after
    defect = any(st != 422 for st, _ in replies) or statistics.median(during) > 0.3
    return _body_result("token-id-body", what, replies, took, during, polls, defect)


def chat_message_body(url: str, messages: int = 28_000, clients: int = 2, bodies: int = 8) -> Result:
    """Chat bodies of ~1 MB of short messages (more than any context holds: 400) are refused
    from their count, and /health stays fast meanwhile: each message was validated, checked for
    bad text and rendered first, which held the event loop about 90 ms per body."""
    chat = {"messages": [{"role": "user", "content": "ab"}] * messages, "max_tokens": 1}
    body = json.dumps(chat, separators=(",", ":")).encode()
    replies, took, during, polls = _bodies_beside_health(url, "/v1/chat/completions", body, clients, bodies)
    what = (
        f"{clients} clients each sending {bodies} chat bodies of {messages:,} messages ({len(body) / 1e6:.2f} MB) "
        "one after another; /health polled every 100 ms"
    )
    # 2026-12-05, 2-core host, eager steps: slowest reply 276 and 194 ms before the count came
    # first (each body held the loop about 90 ms, and two clients wait on each other), 40 and 34 after
    slowest = max((s for _, s in replies), default=float("inf"))
    defect = any(st != 400 for st, _ in replies) or slowest > 0.15
    return _body_result("chat-message-body", what, replies, took, during, polls, defect)


def logit_bias_oversized(url: str, entries: int = 60_000, clients: int = 2, bodies: int = 8) -> Result:
    """/v1/completions bodies whose logit_bias has more entries than the vocabulary has tokens
    (0.6 MB; 400) are refused from its length: each key was checked to be a token id on the
    event loop before any id was found out of range, which cost about twice as much a body."""
    bias = {str(i): 1 for i in range(entries)}
    body = json.dumps({"prompt": "hi", "max_tokens": 1, "logit_bias": bias}, separators=(",", ":")).encode()
    replies, took, during, polls = _bodies_beside_health(url, "/v1/completions", body, clients, bodies)
    what = (
        f"{clients} clients each sending {bodies} completions with a logit_bias of {entries:,} entries "
        f"({len(body) / 1e6:.2f} MB) one after another; /health polled every 100 ms"
    )
    # 2026-12-05, 2-core host, eager steps: 16 bodies in 0.86 and 0.91 s before the length came
    # first (54 and 57 ms a body), 0.53 and 0.46 s after (33 and 29 ms: the JSON parse, validation,
    # the text check)
    defect = any(st != 400 for st, _ in replies) or took / max(1, len(replies)) > 0.04
    return _body_result("logit-bias-oversized", what, replies, took, during, polls, defect)


# 2026-12-05, 2-core host, eager steps: 16 bodies in 2.74 s before the first element picked the
# shape (171 ms a body), 1.61 and 1.65 s after (101 and 103 ms: parsing and validating the lists is left)
ID_LIST_BODY_S = 0.16


def id_list_prompt(url: str, lists: int = 200_000, clients: int = 2, bodies: int = 8) -> Result:
    """/v1/completions bodies whose prompt is 200,000 one-id lists (0.8 MB; 400: more prompts than
    a request takes) cost the event loop one validation of the lists: the prompt's union was
    tried shape by shape, each wrong shape refusing every element first. About 0.1 s a body is
    still left (docs/reliability.md)."""
    body = json.dumps({"prompt": [[1]] * lists, "max_tokens": 1}, separators=(",", ":")).encode()
    replies, took, during, polls = _bodies_beside_health(url, "/v1/completions", body, clients, bodies)
    what = (
        f"{clients} clients each sending {bodies} completions whose prompt is {lists:,} lists of one token id "
        f"({len(body) / 1e6:.2f} MB) one after another; /health polled every 100 ms"
    )
    defect = any(st != 400 for st, _ in replies) or took / max(1, len(replies)) > ID_LIST_BODY_S
    return _body_result("id-list-prompt", what, replies, took, during, polls, defect)


def sse_post(url: str, path: str, body: Mapping[str, Any]) -> tuple[int, list[dict[str, Any]], str]:
    """POST a streamed OpenAI request: (status, its `data:` chunks but [DONE], the error text if not 200)."""
    events: list[dict[str, Any]] = []
    with httpx.stream("POST", url + path, json=body, timeout=120) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, events, error_message(r)
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    return r.status_code, events, ""


def chat_default_max_tokens(url: str) -> Result:
    """/v1/chat/completions without max_tokens is served when max_new_tokens is at least the context
    (the default model: 256 and 256); it asked for one token more than the context left, and got 400."""
    ctx = httpx.get(f"{url}/info", timeout=10).json()["max_seq_len"]
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Good morrow, cousin."}], "temperature": 0}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    plain = f"{r.status_code}" + (f" ({r.json()['usage']})" if r.status_code == 200 else f" {error_message(r)!r}")
    streamed, events, err = sse_post(
        url, "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    usage = next((e["usage"] for e in reversed(events) if e.get("usage")), None)
    return Result(
        "chat-default-max-tokens",
        f"/v1/chat/completions without max_tokens, plain and streamed (MTP_MAX_NEW_TOKENS unset; context {ctx})",
        f"plain {plain}; streamed {streamed}" + (f" ({usage})" if usage else f" {err!r}" if err else ""),
        r.status_code != 200 or streamed != 200,
        {"plain": r.status_code, "streamed": streamed, "streamed_usage": usage},
    )


def _logprobs_pair(url: str, body: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The logprobs of one greedy completion unstreamed, and its streamed chunks' logprobs joined
    (tokens, text_offset) with the streamed text."""
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    r.raise_for_status()
    whole = r.json()["choices"][0]
    status, events, err = sse_post(url, "/v1/completions", {**body, "stream": True})
    if status != 200:
        raise RuntimeError(f"streamed: {status} {err}")
    joined: dict[str, Any] = {"tokens": [], "text_offset": [], "text": ""}
    for e in events:
        for c in e.get("choices", []):
            joined["text"] += c["text"]
            if c.get("logprobs"):
                joined["tokens"] += c["logprobs"]["tokens"]
                joined["text_offset"] += c["logprobs"]["text_offset"]
    unstreamed = {"tokens": whole["logprobs"]["tokens"], "text_offset": whole["logprobs"]["text_offset"]}
    return {**unstreamed, "text": whole["text"]}, joined


def streamed_logprobs(url: str, max_tokens: int = 24) -> Result:
    """Streamed /v1/completions logprobs give each token's own text and offset, as the unstreamed reply
    does (they gave the text released with the token, empty while a stop sequence might begin, and 0)."""
    body: dict[str, Any] = {"prompt": "ROMEO:", "max_tokens": max_tokens, "temperature": 0, "logprobs": 2}
    plain = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    # a stop that matches the text's start and never ends: it holds text back from there on
    held = plain[1:4] + next(c for c in "~|#@^" if c not in plain)
    parts, diffs = [], {}
    for label, case in (("no stop", body), (f"stop {held!r}", {**body, "stop": [held]})):
        whole, streamed = _logprobs_pair(url, case)
        differ = [k for k in ("tokens", "text_offset", "text") if whole[k] != streamed[k]]
        parts.append(f"{label}: {len(whole['tokens'])} tokens, " + (f"{'/'.join(differ)} differ" if differ else "same"))
        if differ:
            diffs[label] = {k: {"unstreamed": whole[k][:8], "streamed": streamed[k][:8]} for k in differ}
    example = next(iter(diffs.values()), {}).get("text_offset")
    return Result(
        "streamed-logprobs",
        f"/v1/completions greedy, {max_tokens} tokens, logprobs=2: streamed chunks' tokens, text_offset and "
        "text against the unstreamed reply",
        "; ".join(parts)
        + (f"; e.g. text_offset {example['streamed']} streamed, {example['unstreamed']} unstreamed" if example else ""),
        bool(diffs),
        {"differences": diffs},
    )


def logit_bias_keys(url: str) -> Result:
    """logit_bias keys are token ids in decimal ASCII digits, and stream_options needs stream: int()
    took ' 5', '1_0', '05' (one token with '5') and Arabic-Indic digits, and stream_options was ignored."""
    base = {"prompt": "ROMEO:", "max_tokens": 2}
    chat = {"messages": [{"role": "user", "content": "ROMEO:"}], "max_tokens": 2}
    cases: list[tuple[str, str, dict[str, Any]]] = [
        (f"logit_bias {k!r}", "/v1/completions", {**base, "logit_bias": {k: 1.0}})
        for k in (" 5", "1_0", "05", "+5", "\u0665")  # U+0665: Arabic-Indic five
    ]
    cases += [
        ("stream_options without stream", "/v1/completions", {**base, "stream_options": {"include_usage": True}}),
        (
            "chat stream_options without stream",
            "/v1/chat/completions",
            {**chat, "stream_options": {"include_usage": True}},
        ),
    ]
    got = {label: httpx.post(url + path, json=body, timeout=60).status_code for label, path, body in cases}
    control = httpx.post(f"{url}/v1/completions", json={**base, "logit_bias": {"5": 1.0}}, timeout=60).status_code
    return Result(
        "logit-bias-keys",
        "/v1/completions with logit_bias keys that int() takes but are not decimal token ids; stream_options "
        "without stream (also chat); control: logit_bias {'5': 1.0}",
        "; ".join(f"{k}: {s}" for k, s in got.items()) + f"; control {control}",
        any(s != 400 for s in got.values()) or control != 200,
        {"statuses": got, "control": control},
    )


def _completion(url: str, prompt: str, max_tokens: int, stop: str | None, stream: bool) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stop": stop, "stream": stream}
    if not stream:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        r.raise_for_status()
        return str(r.json()["choices"][0]["text"])
    status, events, err = sse_post(url, "/v1/completions", body)
    if status != 200:
        raise RuntimeError(f"streamed /v1/completions: {status} {err}")
    return "".join(c["text"] for e in events for c in e.get("choices", []))


def stop_stream_leak(url: str, max_tokens: int = 60) -> Result:
    """With a stop sequence, the streamed text equals the unstreamed text (no part of the stop leaks)."""
    pairs: list[tuple[str, str]] = []
    for prompt in ("ROMEO:", "JULIET:", "KING RICHARD:"):
        text = _completion(url, prompt, max_tokens, None, stream=False)
        for offset, length in ((4, 3), (14, 4), (24, 5), (34, 6)):  # several tokens each (bytes on this model)
            stop = text[offset : offset + length]
            if len(stop) == length and stop.strip():
                pairs.append((prompt, stop))
    diffs = []
    for prompt, stop in pairs:
        plain = _completion(url, prompt, max_tokens, stop, stream=False)
        streamed = _completion(url, prompt, max_tokens, stop, stream=True)
        if plain != streamed:
            diffs.append({"prompt": prompt, "stop": stop, "unstreamed": plain[-12:], "streamed": streamed[-12:]})
    example = ""
    if diffs:
        d = diffs[0]
        example = f"; e.g. stop {d['stop']!r}: streamed ends {d['streamed']!r}, unstreamed {d['unstreamed']!r}"
    return Result(
        "stop-stream-leak",
        f"/v1/completions greedy, {max_tokens} tokens, streamed vs unstreamed, with stop sequences from the output",
        f"{len(diffs)} of {len(pairs)} (prompt, stop) pairs differ{example}",
        bool(diffs) if pairs else None,
        {"differences": diffs},
    )

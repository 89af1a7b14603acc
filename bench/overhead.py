"""How much does ModelFence add? Side by side, in one run, against one fast fake upstream.

Targets (each started and stopped by this script, all on 127.0.0.1, free ports):

- ``direct``            client -> fake upstream (the baseline every "added" number subtracts);
- ``floor``             bench/floor_proxy.py: raw ASGI + one pooled aiohttp session on
                        uvicorn/uvloop/httptools, no features (the Python floor);
- ``modelfence-memory`` ``modelfence serve`` with in-process limits;
- ``modelfence-redis``  ``modelfence serve`` with Redis limits (skipped if Redis is down);
- ``modelfence-detection`` memory limits with the detector on (shadow mode: it decides and
                        records but never blocks the load generator); the detector child
                        runs on the proxy's core, so its CPU counts against the proxy
                        (``--detector-priority`` sets how it shares that core);
- ``litellm``           LiteLLM proxy 1.108.7 in its own virtualenv (created on first use).

For each target:

1. open loop, non-streaming chat completions at ``--rate`` req/s for ``--duration`` s:
   latency p50/p99 (added = target minus direct), and the CPU time the proxy process and
   its children spent in that window -> CPU µs per request -> requests/s per core;
2. open loop, ``stream: true`` at the same rate: time to first chunk (TTFC) p50/p99;
3. closed loop, ``--concurrency`` connections for ``--closed-duration`` s with the proxy
   pinned to core 1 and the load generator + fake upstream on core 0: req/s, and req/s per
   proxy core (req/s divided by the cores the proxy actually used, which is what counts when
   the load generator and upstream, sharing one core, cannot saturate the proxy);
4. for direct, floor and ModelFence with memory and Redis limits: open loop at
   ``--large-rate`` req/s with a chat prompt of about 100k tokens (~400 KB) and with a
   64-row classifier batch (Open Inference Protocol), ``--large-duration`` s each;
5. with ``--profile``: one more closed-loop run under py-spy on each ModelFence target; a
   flame graph SVG and a top-functions table land in bench/results/.

The goals are ratios and differences against the floor proxy of the same run: throughput
per core >= 65% of the floor's with memory limits and >= 50% with Redis limits; added
latency p50 within 0.2 ms (memory) / 0.5 ms (Redis) of the floor's and p99 within 0.5 ms;
time to first chunk within 0.2 ms; the large bodies within 2 ms of the floor's p50.

Writes bench/results/overhead-<stamp>.json (raw latencies included) and the results table
into docs/BENCHMARKS.md between the ``overhead:begin``/``overhead:end`` markers.

    python bench/overhead.py                 # full run (~8 minutes)
    python bench/overhead.py --quick         # a few seconds per target, for development
    python bench/overhead.py --quick --targets direct,floor,modelfence-memory --profile
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from modelfence.testing.processes import free_port

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
DOCS = ROOT / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- overhead:begin -->", "<!-- overhead:end -->"

LITELLM_VERSION = "1.108.7"
DEFAULT_LITELLM_VENV = Path(tempfile.gettempdir()) / "modelfence-bench-litellm"
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"
ALL_TARGETS = ["direct", "floor", "modelfence-memory", "modelfence-detection", "modelfence-redis",
               "litellm"]

CHAT_BODY = {"model": "fake-chat", "max_tokens": 16,
             "messages": [{"role": "user", "content": "Say hello, request @N@"}]}
STREAM_BODY = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True},
               "fake_chunks": 5, "fake_chunk_delay": 0.005}

CHAT_PATH = "/v1/chat/completions"
# Large bodies: a prompt of about 100k tokens (~400 KB) and a 64-row classifier batch.
BIG_PROMPT_BODY = {"model": "fake-chat", "max_tokens": 16, "messages": [
    {"role": "user", "content": "request @N@: " + "lorem ipsum dolor sit amet " * 15_000}]}
BATCH_MODEL = "fake-digits"
BATCH_PATH = f"/v2/models/{BATCH_MODEL}/infer"
BATCH_BODY = {"id": "@N@", "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [64, 64],
                                       "data": [(i * 37 % 17) / 16 for i in range(64 * 64)]}]}
LARGE_BODIES = {"big_prompt": (BIG_PROMPT_BODY, CHAT_PATH),
                "batch64": (BATCH_BODY, BATCH_PATH)}
LARGE_NAMES = tuple(LARGE_BODIES)
MAX_ARG_BODY = 100_000  # longer bodies reach the load generator through a file

# The targets: ratios and differences against the floor proxy measured in the same run.
GOAL_SHARE_OF_FLOOR_MEMORY = 0.65  # closed-loop req/s per core, memory limits
GOAL_SHARE_OF_FLOOR_REDIS = 0.50  # the same with Redis limits
GOAL_P50_BEYOND_FLOOR_MEMORY_MS = 0.2  # added p50 at --rate, beyond the floor's added p50
GOAL_P50_BEYOND_FLOOR_REDIS_MS = 0.5
GOAL_P99_BEYOND_FLOOR_MS = 0.5  # added p99, memory and Redis
GOAL_TTFC_BEYOND_FLOOR_MS = 0.2  # added time to first chunk p50, memory and Redis
GOAL_LARGE_BEYOND_FLOOR_MS = 2.0  # large bodies: added p50 beyond the floor's, same body
GOAL_DETECTION_MS = 0.1  # "zero" within what repeated runs of one target differ by

LARGE_TARGETS = ("direct", "floor", "modelfence-memory", "modelfence-redis")
LOADGEN_CORE, PROXY_CORE = 0, 1
NOISY_CORES = 0.3  # other work above this many cores makes a run's verdicts unreliable


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- processes

NICE = 0  # set from --nice: scheduling priority of every process the benchmark starts


def pinned(cmd: list[str], core: int | None) -> list[str]:
    if NICE:
        cmd = ["nice", "-n", str(NICE), *cmd]
    if core is None or shutil.which("taskset") is None:
        return cmd
    return ["taskset", "-c", str(core), *cmd]


@dataclass
class Proc:
    """A process this script started; stopped by its own pid (and its children's pids)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, cmd: list[str], workdir: Path, env: dict[str, str] | None = None,
              core: int | None = None, cwd: Path | None = None) -> Proc:
        log = workdir / f"{name}.log"
        handle = log.open("wb")
        popen = subprocess.Popen(pinned(cmd, core), stdout=handle, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, cwd=cwd or workdir,
                                 start_new_session=True)
        handle.close()
        return cls(name, popen, log)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if not self.alive():
            return
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            children = []
        for sig, wait in ((signal.SIGINT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                self.popen.send_signal(sig)
                self.popen.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        for child in children:
            try:
                child.terminate()
                child.wait(3)
            except psutil.TimeoutExpired:
                child.kill()
            except psutil.Error:
                pass


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its children (live ones and reaped ones)."""
    try:
        proc = psutil.Process(pid)
        t = proc.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in proc.children(recursive=True):
            try:
                c = child.cpu_times()
                total += c.user + c.system
            except psutil.Error:
                pass
        return float(total)
    except psutil.Error:
        return float("nan")


def cpu_main_seconds(pid: int) -> float:
    """User + system CPU of the process alone (threads included, children not)."""
    try:
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return float("nan")


def system_busy_seconds() -> float:
    busy = 0.0
    for t in psutil.cpu_times(percpu=True):
        busy += t.user + t.system + t.nice + getattr(t, "irq", 0) + getattr(t, "softirq", 0) \
            + getattr(t, "steal", 0)
    return busy


def redis_server_pid() -> int | None:
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "redis-server":
            return int(proc.pid)
    return None


# --------------------------------------------------------------------------- HTTP helpers

def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
         timeout: float = 10.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # loopback only
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(url: str, proc: Proc | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited (code {proc.popen.returncode}):\n{proc.tail()}")
        try:
            status, _ = http("GET", url, timeout=2)
            if status < 500:
                return
            last = f"status {status}"
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(0.2)
    tail = proc.tail() if proc else ""
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s ({last})\n{tail}")


# --------------------------------------------------------------------------- targets

@dataclass
class Target:
    name: str
    label: str
    base: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    proc: Proc | None = None
    note: str = ""


def start_upstream(workdir: Path, pin: bool) -> tuple[str, Proc]:
    port = free_port()
    proc = Proc.start("fake-upstream", [sys.executable, "-m", "modelfence.testing.fake_upstream",
                                        "--port", str(port)], workdir,
                      core=LOADGEN_CORE if pin else None, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/v2/health/ready", proc, 30)
    return url, proc


def start_floor(upstream: str, workdir: Path, pin: bool) -> Target:
    port = free_port()
    proc = Proc.start("floor", [sys.executable, str(BENCH / "floor_proxy.py"), "--upstream",
                                upstream, "--port", str(port)], workdir,
                      core=PROXY_CORE if pin else None)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base + "/v1/models", proc, 30)
    except Exception:
        proc.stop()
        raise
    return Target("floor", "floor proxy (raw ASGI + aiohttp)", base, {}, proc)


def modelfence_config(upstream: str, port: int, backend: str, workdir: Path,
                      detection: bool, trusted_proxies: tuple[str, ...] = (),
                      detector_priority: str | None = None) -> Path:
    import yaml

    from modelfence.config import Config

    big = {"requests_per_minute": 10_000_000, "tokens_per_minute": 1_000_000_000,
           "concurrent_requests": 1_000_000, "usd_per_day": 1e9}  # the largest allowed
    config = {
        "server": {"host": "127.0.0.1", "port": port, "trusted_proxies": list(trusted_proxies)},
        "upstreams": [{"name": "fake", "url": upstream, "kind": "openai", "models": ["*"]},
                      {"name": "fake-oip", "url": upstream, "kind": "oip",
                       "models": [BATCH_MODEL]}],
        "store": f"sqlite:///{workdir / 'modelfence.db'}",
        "admin_token": ADMIN_TOKEN,
        "secret": "bench-secret-" + os.urandom(16).hex(),
        "secret_file": str(workdir / "modelfence.secret"),
        "limits": {"backend": backend, "tiers": {"default": big}},
        "log_level": "warning",
    }
    if "detection" in Config.model_fields:
        # The detector is off the request path (a child process, or `modelfence detect`
        # workers elsewhere). Left on, it would share the proxy's pinned core, and it
        # rightly finds a load generator's perfectly regular spacing unnatural and blocks
        # it. The modelfence-detection target runs it in shadow mode (decides, records,
        # never acts).
        config["detection"] = {"enabled": True, "shadow": True} if detection else {
            "enabled": False}
        if detection and detector_priority is not None:
            config["detection"]["process_priority"] = detector_priority
    path = workdir / f"modelfence-{'memory' if backend == 'memory' else 'redis'}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def modelfence_command() -> list[str]:
    exe = shutil.which("modelfence")
    return [exe] if exe else [sys.executable, "-m", "modelfence"]


def create_modelfence_key(base: str, config: Path, workdir: Path) -> str:
    """Admin API first (POST /admin/v1/keys); the CLI's `keys create` if that is missing."""
    try:
        status, raw = http("POST", base + "/admin/v1/keys", {"client": "bench", "tier": "default"},
                           {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    except OSError as exc:
        status, raw = 0, str(exc).encode()
    if status in (200, 201):
        data = json.loads(raw)
        for name in ("key", "secret", "api_key", "token", "value"):
            value = data.get(name)
            if isinstance(value, str) and len(value) >= 16:
                return value
        for value in data.values():  # an unexpected field name: take the key-looking string
            if isinstance(value, str) and value.startswith(("mf_", "mf-", "sk-")):
                return value
        say(f"admin API answered {status} but no key field was recognised: {raw[:200]!r}")
    else:
        say(f"admin API key creation answered {status}; using `modelfence keys create`")
    out = subprocess.run([*modelfence_command(), "--config", str(config), "keys", "create",
                          "--client", "bench"], capture_output=True, text=True, cwd=workdir,
                         timeout=60, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"`modelfence keys create` failed ({out.returncode}):\n"
                           f"{out.stdout}\n{out.stderr}")
    return out.stdout.strip().splitlines()[-1].strip()


def start_modelfence(upstream: str, backend: str, workdir: Path, pin: bool,
                     detection: bool, trusted_proxies: tuple[str, ...] = (),
                     detector_priority: str | None = None) -> Target:
    name = "modelfence-detection" if detection else (
        "modelfence-memory" if backend == "memory" else "modelfence-redis")
    port = free_port()
    sub = workdir / name
    sub.mkdir(exist_ok=True)
    config = modelfence_config(upstream, port, backend, sub, detection, trusted_proxies,
                               detector_priority)
    proc = Proc.start(name, [*modelfence_command(), "--config", str(config), "serve", "--port",
                             str(port)], sub, core=PROXY_CORE if pin else None)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base + "/healthz", proc, 60)
        key = create_modelfence_key(base, config, sub)
    except Exception:
        proc.stop()
        raise
    label = "ModelFence, Redis limits" if backend != "memory" else (
        f"ModelFence, memory limits + detection (shadow{', ' + detector_priority if detector_priority else ''})"
        if detection else "ModelFence, memory limits")
    return Target(name, label, base, {"Authorization": f"Bearer {key}"}, proc)


def ensure_litellm(venv: Path) -> Path:
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    say(f"LiteLLM is not installed yet: creating {venv} and installing "
        f"'litellm[proxy]=={LITELLM_VERSION}' (+ httptools) into it — a few minutes, once")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q",
                    f"litellm[proxy]=={LITELLM_VERSION}", "httptools"], check=True)
    return exe


def start_litellm(upstream: str, workdir: Path, pin: bool, venv: Path) -> Target:
    import yaml

    exe = ensure_litellm(venv)
    port = free_port()
    sub = workdir / "litellm"
    sub.mkdir(exist_ok=True)
    config = sub / "litellm.yaml"
    master_key = "sk-bench-" + os.urandom(16).hex()
    config.write_text(yaml.safe_dump({
        "model_list": [{"model_name": "fake-chat",
                        "litellm_params": {"model": "openai/fake-chat",
                                           "api_base": upstream + "/v1",
                                           "api_key": "sk-fake-upstream"}}],
        "litellm_settings": {"set_verbose": False, "telemetry": False},
        # LiteLLM 1.108 refuses to start without a master key; with one and no database,
        # each request's key is compared with it (its cheapest authenticated setup).
        "general_settings": {"master_key": master_key},
    }, sort_keys=False))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "LITELLM_TELEMETRY": "False", "DISABLE_SCHEMA_UPDATE": "True"}
    env.pop("DATABASE_URL", None)
    proc = Proc.start("litellm", [str(exe), "--config", str(config), "--host", "127.0.0.1",
                                  "--port", str(port), "--num_workers", "1"], sub, env=env,
                      core=PROXY_CORE if pin else None)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base + "/health/liveliness", proc, 180)
    except Exception:
        proc.stop()
        raise
    return Target("litellm", f"LiteLLM proxy {LITELLM_VERSION} (master key, no DB)", base,
                  {"Authorization": f"Bearer {master_key}"}, proc)


def verify(target: Target) -> None:
    url = target.base + "/v1/chat/completions"
    body = {k: v for k, v in CHAT_BODY.items()}
    body["messages"] = [{"role": "user", "content": "Say hello, check"}]
    deadline = time.monotonic() + 5  # a key created by the CLI may take a moment to be seen
    while True:
        status, raw = http("POST", url, body, target.headers)
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if status != 200 or b"choices" not in raw:
        raise RuntimeError(f"{target.name}: chat completion answered {status}: {raw[:300]!r}")
    stream = {**STREAM_BODY, "messages": body["messages"]}
    status, raw = http("POST", url, stream, target.headers)
    if status != 200 or b"data:" not in raw:
        raise RuntimeError(f"{target.name}: streaming answered {status}: {raw[:300]!r}")


# --------------------------------------------------------------------------- load runs

def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize_us(values: list[int]) -> dict[str, float]:
    ms = [v / 1000 for v in values]
    return {"n": len(ms), "p50": pct(ms, 0.5), "p90": pct(ms, 0.9), "p99": pct(ms, 0.99),
            "p999": pct(ms, 0.999), "max": max(ms) if ms else float("nan"),
            "mean": sum(ms) / len(ms) if ms else float("nan")}


def run_load(target: Target, mode: str, body: dict[str, Any], args: argparse.Namespace,
             watch: dict[str, int | None], duration: float,
             rate: float | None = None, path: str = CHAT_PATH,
             expect_ok: bool = True) -> dict[str, Any]:
    """One load-generator run; CPU of the watched processes sampled over its measured window.
    With ``expect_ok`` a run with more than 1% of answers other than 200 is marked invalid
    (a flood of refused requests expects none)."""
    cmd = [sys.executable, str(BENCH / "loadgen.py"), "--url", target.base + path,
           "--mode", mode, "--duration", str(duration), "--warmup", str(args.warmup)]
    fd, name = tempfile.mkstemp(prefix="loadgen-", suffix=".json")
    os.close(fd)
    out_file = Path(name)
    err_file = out_file.with_suffix(".err")
    body_file = out_file.with_suffix(".body")
    text = json.dumps(body)
    if len(text) > MAX_ARG_BODY:
        body_file.write_text(text)
        cmd += ["--body-file", str(body_file)]
    else:
        cmd += ["--body", text]
    cmd += ["--out", str(out_file)]
    if mode == "open":
        cmd += ["--rate", str(rate or args.rate)]
    else:
        cmd += ["--concurrency", str(args.concurrency)]
    for name, value in target.headers.items():
        cmd += ["--header", f"{name}: {value}"]
    with err_file.open("wb") as err:
        popen = subprocess.Popen(pinned(cmd, LOADGEN_CORE if args.pin else None),
                                 stdout=subprocess.PIPE, stderr=err, text=True)
    watch = {**watch, "loadgen": popen.pid}
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    result: dict[str, Any] | None = None
    assert popen.stdout is not None
    try:
        for line in popen.stdout:
            if line.startswith("PHASE measure"):
                before = {k: cpu_seconds(p) for k, p in watch.items() if p}
                if watch.get("proxy"):
                    before["proxy_main"] = cpu_main_seconds(watch["proxy"])  # type: ignore[arg-type]
                before["_wall"] = time.monotonic()
                before["_system"] = system_busy_seconds()
            elif line.startswith("PHASE done"):
                after = {k: cpu_seconds(p) for k, p in watch.items() if p}
                if watch.get("proxy"):
                    after["proxy_main"] = cpu_main_seconds(watch["proxy"])  # type: ignore[arg-type]
                after["_wall"] = time.monotonic()
                after["_system"] = system_busy_seconds()
            elif line.startswith("RESULT"):
                result = json.loads(out_file.read_text())
        popen.wait()
    finally:
        if popen.poll() is None:  # interrupted: the load generator goes too
            popen.kill()
            popen.wait()
        out_file.unlink(missing_ok=True)
        body_file.unlink(missing_ok=True)
        stderr = err_file.read_text(errors="replace")
        err_file.unlink(missing_ok=True)
    if result is None or not before or not after:
        raise RuntimeError(f"load generator failed ({popen.returncode}): {stderr[-2000:]}")
    wall = after["_wall"] - before["_wall"]
    cpu = {k: after[k] - before[k] for k in before if not k.startswith("_") and k in after}
    ours = sum(v for k, v in cpu.items() if not math.isnan(v) and k != "proxy_main")
    sent = sum(result["statuses"].values()) + result.get("errors", 0)
    bad = sent - result["statuses"].get("200", 0)
    if expect_ok and sent and bad / sent > 0.01:
        note = (f"{target.name} {mode} run: only {result['statuses'].get('200', 0)} of {sent} "
                f"requests answered 200 (statuses {result['statuses']}, {result['errors']} "
                f"errors, e.g. {result['error_examples'][:2]}): its numbers are not valid")
        say("WARNING " + note)
        result["invalid"] = note
    result["window_s"] = wall
    result["cpu_s"] = cpu
    result["other_load_cores"] = max(0.0, (after["_system"] - before["_system"] - ours) / wall)
    return result


def log_warnings(proc: Proc, limit: int = 5) -> list[str]:
    """The target's own WARNING/ERROR log lines, grouped with digits masked, most frequent first."""
    import re

    counts: Counter[str] = Counter()
    try:
        text = proc.log.read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        if " WARNING " in line or " ERROR " in line or line.startswith("Traceback"):
            message = line.split(" ", 2)[-1] if line[:4].isdigit() else line
            counts[re.sub(r"\d+", "N", message)[:200]] += 1
    return [f"{n}× {m}" for m, n in counts.most_common(limit)]


def measure_large(target: Target, args: argparse.Namespace,
                  watch: dict[str, int | None]) -> dict[str, Any]:
    """Open loop at ``--large-rate`` with each large body: latency and proxy CPU per request."""
    out: dict[str, Any] = {}
    for name, (body, path) in LARGE_BODIES.items():
        say(f"{target.name}: open loop {args.large_rate:g} req/s for {args.large_duration:g}s "
            f"({name})")
        run = run_load(target, "open", body, args, watch, args.large_duration,
                       args.large_rate, path)
        latency = summarize_us(run.pop("latency_us"))
        run.pop("ttfb_us")
        run.pop("send_lag_us")
        cpu = run["cpu_s"].get("proxy")
        out[name] = {"latency": latency, "ok": run["ok"], "invalid": run.get("invalid"),
                     "proxy_cpu_us_per_req": cpu / run["ok"] * 1e6 if cpu and run["ok"] else None}
        say(f"{target.name}: {name} p50 {latency['p50']:.3f} ms, p99 {latency['p99']:.3f} ms")
    return out


def metrics(base: str) -> dict[str, float]:
    """``/metrics`` samples as ``name{label="v",...}`` -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:  # loopback
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def detector_report(base: str) -> dict[str, Any]:
    """How far the detector child kept up over the whole run: events the gateway emitted,
    dropped, and the detector read, and its lag (event time to published verdict) as the
    upper bounds of the histogram buckets holding its p50 and p99."""
    samples = metrics(base)
    fates = {k.split('"')[1]: v for k, v in samples.items()
             if k.startswith('modelfence_telemetry_events_total{fate="')}
    buckets = sorted((float(k.split('"')[1]), v) for k, v in samples.items()
                     if k.startswith('modelfence_detector_lag_seconds_bucket{le="'))
    lagged = buckets[-1][1] if buckets else 0.0

    def quantile(q: float) -> float:
        if lagged == 0:
            return math.nan
        return next((le for le, count in buckets if count >= q * lagged), math.nan)

    return {"emitted": fates.get("emitted", 0.0),
            "dropped": sum(v for k, v in fates.items() if k.startswith("dropped")),
            "read": samples.get("modelfence_detector_events_total{}", 0.0),
            "lag_observed": lagged, "lag_p50_le": quantile(0.5), "lag_p99_le": quantile(0.99)}


def measure_target(target: Target, args: argparse.Namespace, upstream: Proc,
                   redis_pid: int | None, large: bool = False) -> dict[str, Any]:
    watch: dict[str, int | None] = {"upstream": upstream.pid}
    if target.proc is not None:
        watch["proxy"] = target.proc.pid
    if target.name == "modelfence-redis":
        watch["redis"] = redis_pid
    out: dict[str, Any] = {"name": target.name, "label": target.label}

    # Closed loop first: it warms the target up and tells whether it can take --rate at all.
    rate = args.rate
    if args.closed_duration > 0:
        say(f"{target.name}: closed loop, {args.concurrency} connections, "
            f"{args.closed_duration:g}s")
        run = run_load(target, "closed", CHAT_BODY, args, watch, args.closed_duration)
        out["closed"] = run
        busy_name = "proxy" if "proxy" in run["cpu_s"] else "upstream"
        cores = run["cpu_s"].get(busy_name, float("nan")) / run["window_s"]
        out["closed_rps"] = run["rps"]
        out["closed_cores"] = cores
        out["closed_rps_per_core"] = run["rps"] / cores if cores > 0 else float("nan")
        if run["ok"]:
            out["closed_cpu_us_per_req"] = run["cpu_s"].get(busy_name, 0) / run["ok"] * 1e6
        say(f"{target.name}: {run['rps']:.0f} req/s with {busy_name} at {cores:.0%} of a core "
            f"-> {out['closed_rps_per_core']:.0f} req/s per {busy_name} core"
            + (f" ({run['errors']} errors: {run['error_examples'][:2]})" if run["errors"] else ""))
        if run["rps"] * 0.5 < rate:
            rate = max(1.0, float(round(run["rps"] * 0.5)))
            say(f"{target.name}: cannot sustain {args.rate:g} req/s; open-loop runs at "
                f"{rate:g} req/s (half its closed-loop throughput) so latency is not queueing")
    out["open_rate"] = rate
    stream_rate = rate
    if rate < args.rate:
        # a slow target: streaming usually costs it more than a plain answer, so size the
        # streaming rate on its own closed-loop streaming throughput too
        run = run_load(target, "closed", STREAM_BODY, args, watch, min(5.0, args.closed_duration))
        out["closed_stream"] = run
        stream_rate = max(1.0, min(rate, float(round(run["rps"] * 0.5))))
        say(f"{target.name}: {run['rps']:.0f} streams/s in closed loop; streaming open loop at "
            f"{stream_rate:g} req/s")
    out["stream_rate"] = stream_rate

    say(f"{target.name}: open loop {rate:g} req/s for {args.duration:g}s (non-streaming)")
    run = run_load(target, "open", CHAT_BODY, args, watch, args.duration, rate)
    raw: dict[str, list[int]] = {"latency_us": run.pop("latency_us")}
    out["latency"] = summarize_us(raw["latency_us"])
    out["ttfb"] = summarize_us(run.pop("ttfb_us"))
    out["send_lag"] = summarize_us(run.pop("send_lag_us"))
    out["open"] = run
    ok = max(1, run["ok"])
    for name in ("proxy", "upstream", "loadgen", "redis"):
        if name in run["cpu_s"]:
            out[f"{name}_cpu_us_per_req"] = run["cpu_s"][name] / ok * 1e6
    say(f"{target.name}: p50 {out['latency']['p50']:.3f} ms, p99 {out['latency']['p99']:.3f} ms"
        + (f", proxy CPU {out['proxy_cpu_us_per_req']:.0f} µs/req" if "proxy_cpu_us_per_req" in out
           else "") + f", other load {run['other_load_cores']:.2f} cores"
        + (f", {run['errors']} errors {run['error_examples'][:2]}" if run["errors"] else ""))

    say(f"{target.name}: open loop {stream_rate:g} req/s for {args.stream_duration:g}s "
        "(streaming)")
    run = run_load(target, "open", STREAM_BODY, args, watch, args.stream_duration, stream_rate)
    raw["stream_ttfc_us"] = run.pop("ttfb_us")
    out["stream_ttfc"] = summarize_us(raw["stream_ttfc_us"])
    out["stream_total"] = summarize_us(run.pop("latency_us"))
    run.pop("send_lag_us")
    out["raw"] = raw  # per-request microseconds, in send order
    out["stream"] = run
    if "proxy" in run["cpu_s"] and run["ok"]:
        out["stream_proxy_cpu_us_per_req"] = run["cpu_s"]["proxy"] / run["ok"] * 1e6
    warnings = [r["invalid"] for r in (out.get("closed"), out.get("closed_stream"), out["open"],
                                      out["stream"]) if r and r.get("invalid")]
    if warnings:
        out["warnings"] = warnings
    say(f"{target.name}: TTFC p50 {out['stream_ttfc']['p50']:.3f} ms, "
        f"p99 {out['stream_ttfc']['p99']:.3f} ms"
        + (f", {run['errors']} errors {run['error_examples'][:2]}" if run["errors"] else ""))
    if target.name == "modelfence-detection":
        d = out["detector"] = detector_report(target.base)
        say(f"{target.name}: the detector read {d['read']:.0f} of {d['emitted']:.0f} events "
            f"emitted ({d['dropped']:.0f} dropped) and published the verdicts of "
            f"{d['lag_observed']:.0f}; lag p50 ≤ {d['lag_p50_le']:g} s, p99 ≤ {d['lag_p99_le']:g} s")
    if large and args.large_duration > 0:
        out["large"] = measure_large(target, args, watch)
        warnings += [r["invalid"] for r in out["large"].values() if r.get("invalid")]
        if warnings:
            out["warnings"] = warnings
    return out


# --------------------------------------------------------------------------- profiling

def ensure_py_spy() -> str:
    exe = shutil.which("py-spy")
    if exe:
        return exe
    say("py-spy not found: installing it (pip install py-spy) into this environment")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return exe


def profile_target(target: Target, args: argparse.Namespace, stamp: str) -> dict[str, Any]:
    assert target.proc is not None
    exe = ensure_py_spy()
    raw = RESULTS / f"profile-{stamp}-{target.name}.txt"
    say(f"{target.name}: closed loop under py-spy for {args.profile_duration:g}s")
    spy = subprocess.Popen(pinned([exe, "record", "--pid", str(target.proc.pid), "--rate", "250",
                                   "--nonblocking", "--subprocesses", "--format", "raw",
                                   "--output", str(raw)], LOADGEN_CORE if args.pin else None),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    try:
        run_load(target, "closed", CHAT_BODY, args, {}, args.profile_duration)
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy_out, _ = spy.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy_out, _ = spy.communicate()
    if not raw.exists():
        say(f"{target.name}: py-spy wrote nothing: {spy_out[-500:]}")
        return {}
    stacks = read_collapsed(raw)
    svg = raw.with_suffix(".svg")
    svg.write_text(flamegraph_svg(stacks, f"{target.label}: closed loop, py-spy"))
    top = raw.with_name(raw.stem + "-top.md")
    top.write_text(top_functions_md(stacks, target.label))
    say(f"{target.name}: flame graph {svg.relative_to(ROOT)}, top functions "
        f"{top.relative_to(ROOT)}")
    return {"raw": str(raw.relative_to(ROOT)), "svg": str(svg.relative_to(ROOT)),
            "top": str(top.relative_to(ROOT)), "samples": sum(stacks.values())}


def read_collapsed(path: Path) -> Counter[tuple[str, ...]]:
    """py-spy's raw (collapsed) format: ``frame;frame;frame count`` per line."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def _short(frame: str) -> str:
    """``func (path/to/site-packages/pkg/mod.py:12)`` -> ``func (pkg/mod.py:12)``."""
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    where = where.rstrip(")")
    for marker in ("site-packages/", "/src/", "/lib/python3."):
        if marker in where:
            where = where.split(marker, 1)[1]
            if marker == "/lib/python3.":
                where = "stdlib/" + where.split("/", 1)[-1]
            break
    return f"{name} ({where})"


def _location(frame: str) -> str:
    short = _short(frame)
    _, _, where = short.partition(" (")
    return where.rstrip(")").rsplit(":", 1)[0] or short


def top_functions_md(stacks: Counter[tuple[str, ...]], label: str, limit: int = 30) -> str:
    total = sum(stacks.values()) or 1
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    for stack, count in stacks.items():
        frames = [f for f in stack if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        leaf = _short(frames[-1])
        self_time[leaf.rsplit(":", 1)[0]] += count
        where = _location(frames[-1])
        by_file[where] += count
        by_package[where.split("/", 1)[0] if "/" in where else where] += count
        for name in {_short(f).rsplit(":", 1)[0] for f in frames}:
            inclusive[name] += count

    def table(title: str, counter: Counter[str]) -> list[str]:
        rows = [f"### {title}", "", "| share | samples | where |", "|---:|---:|---|"]
        rows += [f"| {n / total:.1%} | {n} | `{k}` |" for k, n in counter.most_common(limit)]
        return rows + [""]

    lines = [f"# py-spy profile: {label}", "",
             f"{total} samples (250 Hz, non-blocking, idle frames left out).", ""]
    lines += table("Self time by package (leaf frame)", by_package)
    lines += table("Self time by file (leaf frame)", by_file)
    lines += table("Self time by function (leaf frame)", self_time)
    lines += table("Inclusive time by function (on the stack)", inclusive)
    return "\n".join(lines)


def flamegraph_svg(stacks: Counter[tuple[str, ...]], title: str, width: int = 1400) -> str:
    """A small self-contained flame graph (root at the bottom; hover a box for its numbers)."""
    tree: dict[str, Any] = {"n": 0, "c": {}}
    for stack, count in stacks.items():
        node = tree
        node["n"] += count
        for frame in stack:
            node = node["c"].setdefault(_short(frame), {"n": 0, "c": {}})
            node["n"] += count
    total = tree["n"] or 1
    rows: list[tuple[int, float, float, str, int]] = []

    def walk(node: dict[str, Any], depth: int, x: float) -> int:
        deepest = depth
        for name, child in sorted(node["c"].items()):
            w = child["n"] / total * (width - 20)
            if w >= 0.3:
                rows.append((depth, x, w, name, child["n"]))
                deepest = max(deepest, walk(child, depth + 1, x))
            x += w
        return deepest

    depth = walk(tree, 0, 10.0) + 1
    h = 16
    height = depth * h + 50
    def esc(text: str) -> str:
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
              'font-family="monospace" font-size="11">'),
             '<rect width="100%" height="100%" fill="#fdfdf6"/>',
             f'<text x="10" y="20" font-size="14">{esc(title)} — {total} samples</text>']
    for d, x, w, name, n in rows:
        y = height - 10 - (d + 1) * h
        seed = sum(map(ord, name.split(" (")[0]))
        color = f"rgb({205 + seed % 50},{80 + seed * 7 % 130},{40 + seed * 13 % 60})"
        label = esc(name)
        text = ""
        if w > 40:
            text = f'<text x="{x + 3:.1f}" y="{y + 12}">{esc(name[: int(w / 6.6)])}</text>'
        parts.append(f'<g><title>{label} — {n} samples ({n / total:.1%})</title>'
                     f'<rect x="{x:.1f}" y="{y}" width="{max(w - 0.5, 0.3):.1f}" height="{h - 1}" '
                     f'fill="{color}"/>{text}</g>')
    parts.append("</svg>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- report

def rel(path: Path) -> Path:
    path = path.resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "load_avg": os.getloadavg()}


def fmt(value: float | None, spec: str = ".2f") -> str:
    if value is None or math.isnan(value):
        return "—"
    return format(value, spec)


def build_rows(results: dict[str, dict[str, Any]], baseline: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    floor = results.get("floor", {}).get("closed_rps_per_core")
    lite = results.get("litellm", {}).get("closed_rps_per_core")
    for name, r in results.items():
        row: dict[str, Any] = {"name": name, "label": r["label"]}
        if name == "direct":
            row["p50_added"] = row["p99_added"] = row["ttfc_p50_added"] = 0.0
        else:
            row["p50_added"] = r["latency"]["p50"] - baseline["p50"]
            row["p99_added"] = r["latency"]["p99"] - baseline["p99"]
            row["ttfc_p50_added"] = r["stream_ttfc"]["p50"] - baseline["ttfc_p50"]
            row["ttfc_p99_added"] = r["stream_ttfc"]["p99"] - baseline["ttfc_p99"]
        loads = [r[k]["other_load_cores"] for k in ("closed", "open", "stream")
                 if isinstance(r.get(k), dict) and "other_load_cores" in r[k]]
        row["other_load"] = max(loads) if loads else None
        row["open_rate"] = r.get("open_rate")
        row["stream_rate"] = r.get("stream_rate")
        row["cpu_us"] = r.get("proxy_cpu_us_per_req")
        row["rps_per_core_cpu"] = 1e6 / row["cpu_us"] if row["cpu_us"] else None
        row["closed_rps"] = r.get("closed_rps")
        row["closed_cores"] = r.get("closed_cores")
        row["closed_rps_per_core"] = r.get("closed_rps_per_core") if name != "direct" else None
        per_core = row["closed_rps_per_core"]
        row["vs_floor"] = per_core / floor if per_core and floor else None
        row["vs_litellm"] = per_core / lite if per_core and lite else None
        direct_large = results.get("direct", {}).get("large", {})
        for body, run in r.get("large", {}).items():
            base = direct_large.get(body)
            if base is not None:
                row[f"{body}_p50_added"] = run["latency"]["p50"] - base["latency"]["p50"]
                row[f"{body}_p99_added"] = run["latency"]["p99"] - base["latency"]["p99"]
            row[f"{body}_cpu_us"] = run.get("proxy_cpu_us_per_req")
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]], rate: float) -> str:
    head = ("| target | p50 added ms | p99 added ms | CPU µs/req | req/s per core (from CPU) "
            "| closed-loop req/s (proxy core use) | closed-loop req/s per proxy core "
            "| TTFC added p50 ms | TTFC added p99 ms | per core vs floor | per core vs LiteLLM "
            "| other load (cores) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        closed = "—"
        if r["closed_rps"] is not None:
            closed = f"{r['closed_rps']:,.0f}"
            if r["closed_cores"] is not None and r["name"] != "direct":
                closed += f" ({r['closed_cores']:.0%})"
        at = f" (at {r['open_rate']:g} req/s)" if r.get("open_rate") not in (None, rate) else ""
        sat = f" (at {r['stream_rate']:g} req/s)" if r.get("stream_rate") not in (None, rate) else ""
        lines.append(
            f"| {r['label']} | {fmt(r['p50_added'], '.3f')}{at} | {fmt(r['p99_added'], '.3f')} "
            f"| {fmt(r['cpu_us'], ',.0f')} | {fmt(r['rps_per_core_cpu'], ',.0f')} | {closed} "
            f"| {fmt(r['closed_rps_per_core'], ',.0f')} | {fmt(r['ttfc_p50_added'], '.3f')}{sat} "
            f"| {fmt(r.get('ttfc_p99_added'), '.3f')} "
            f"| {fmt(r['vs_floor'] * 100 if r['vs_floor'] else None, '.1f')}{'%' if r['vs_floor'] else ''} "
            f"| {fmt(r['vs_litellm'], '.1f')}{'×' if r['vs_litellm'] else ''} "
            f"| {fmt(r['other_load'], '.2f')} |")
    return "\n".join(lines)


def goals(rows: list[dict[str, Any]], rate: float) -> list[tuple[str, bool | None, str]]:
    """The targets, each against the floor proxy of the same run (ratios and differences)."""
    by = {r["name"]: r for r in rows}
    floor, mem, red = by.get("floor"), by.get("modelfence-memory"), by.get("modelfence-redis")
    out: list[tuple[str, bool | None, str]] = []

    def check(label: str, value: float | None, goal: float, higher: bool, unit: str,
              what: str = "") -> None:
        if value is None or math.isnan(value):
            out.append((label, None, "not measured"))
            return
        ok = value >= goal if higher else value <= goal
        shown = "not at that rate" if value == float("inf") else (
            f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}") + unit
        out.append((label, ok, f"{shown}{what} (goal {'≥' if higher else '≤'} {goal:g}{unit})"))

    def at_rate(row: dict[str, Any] | None, key: str) -> float | None:
        # measured at a lower rate because the target could not sustain this one: a fail
        if row and row.get("open_rate") not in (None, rate):
            return float("inf")
        return row.get(key) if row else None

    def minus_floor(ours: float | None, key: str) -> float | None:
        theirs = floor.get(key) if floor else None
        return None if ours is None or theirs is None else ours - theirs

    def beyond_floor(row: dict[str, Any] | None, key: str) -> float | None:
        return minus_floor(at_rate(row, key), key)

    def share(row: dict[str, Any] | None) -> float | None:
        return row["vs_floor"] * 100 if row and row.get("vs_floor") else None

    check("closed-loop req/s per core vs floor proxy, memory limits", share(mem),
          GOAL_SHARE_OF_FLOOR_MEMORY * 100, True, "%")
    check("closed-loop req/s per core vs floor proxy, Redis limits", share(red),
          GOAL_SHARE_OF_FLOOR_REDIS * 100, True, "%")
    beyond = " beyond the floor's"
    check(f"added p50 at {rate:g} req/s, memory limits", beyond_floor(mem, "p50_added"),
          GOAL_P50_BEYOND_FLOOR_MEMORY_MS, False, " ms", beyond)
    check(f"added p50 at {rate:g} req/s, Redis limits", beyond_floor(red, "p50_added"),
          GOAL_P50_BEYOND_FLOOR_REDIS_MS, False, " ms", beyond)
    for label, row in (("memory", mem), ("Redis", red)):
        check(f"added p99 at {rate:g} req/s, {label} limits", beyond_floor(row, "p99_added"),
              GOAL_P99_BEYOND_FLOOR_MS, False, " ms", beyond)
    for label, row in (("memory", mem), ("Redis", red)):
        check(f"added time to first chunk p50, {label} limits",
              beyond_floor(row, "ttfc_p50_added"), GOAL_TTFC_BEYOND_FLOOR_MS, False, " ms", beyond)
    for body, label in (("big_prompt", "100k-token prompt"), ("batch64", "64-row batch")):
        key = f"{body}_p50_added"  # at --large-rate, whatever rate the target sustained
        check(f"added p50 with a {label}, memory limits", minus_floor((mem or {}).get(key), key),
              GOAL_LARGE_BEYOND_FLOOR_MS, False, " ms", beyond)
    on, off = at_rate(by.get("modelfence-detection"), "p50_added"), at_rate(mem, "p50_added")
    check("detection on minus off, added p50 (the hot path only hands events over)",
          on - off if on is not None and off is not None else None, GOAL_DETECTION_MS, False, " ms")
    loads = [r["other_load"] for r in rows if r.get("other_load") is not None]
    if loads and max(loads) > NOISY_CORES:
        # on a busy machine the scheduler, not the proxy, makes the latencies
        out = [(label, ok, f"{detail}; unreliable: other work used up to {max(loads):.2f} cores")
               for label, ok, detail in out]
    return out


def large_table(rows: list[dict[str, Any]]) -> str:
    """Added latency and proxy CPU with the large bodies, for the targets that ran them."""
    measured = [r for r in rows if r["name"] != "direct" and f"{LARGE_NAMES[0]}_cpu_us" in r]
    if not measured:
        return ""
    head = ("| target | 100k-token prompt: p50 added ms | p99 added ms | proxy CPU µs/req "
            "| 64-row batch: p50 added ms | p99 added ms | proxy CPU µs/req |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in measured:
        cells = []
        for body in LARGE_NAMES:
            cells += [fmt(r.get(f"{body}_p50_added"), ".3f"),
                      fmt(r.get(f"{body}_p99_added"), ".3f"), fmt(r.get(f"{body}_cpu_us"), ",.0f")]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_docs(section: str, path: Path) -> None:
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            head, _, rest = text.partition(BEGIN)
            _, _, tail = rest.partition(END)
            path.write_text(head + block + tail)
            return
        path.write_text(text.rstrip() + "\n\n" + block + "\n")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Benchmarks\n\n" + block + "\n")


def report(results: dict[str, dict[str, Any]], again: dict[str, Any] | None,
           args: argparse.Namespace, info: dict[str, Any], command: str, json_path: Path,
           baseline: dict[str, float], skipped: dict[str, str]) -> str:
    rows = build_rows(results, baseline)
    table = markdown_table(rows, args.rate)
    checks = goals(rows, args.rate)
    direct = results.get("direct", {})
    lines = [
        (f"Run {info['date']} on {info['cpu']}, {info['cores']} cores, Python {info['python']} "
         f"(Linux {info['kernel']}); load average at start "
         f"{' / '.join(f'{x:.2f}' for x in info['load_avg_start'])}."),
        "",
        f"Command: `{command}`"
        + (" (quick mode: numbers are indicative only)" if args.quick else ""),
        "",
        f"Open loop {args.rate:g} req/s for {args.duration:g} s (non-streaming chat completions) "
        f"and {args.stream_duration:g} s (streaming, 5 chunks 5 ms apart); closed loop "
        f"{args.concurrency} connections for {args.closed_duration:g} s. "
        + ("Proxy pinned to core 1, load generator and fake upstream to core 0. "
           if args.pin else "No CPU pinning. ")
        + (f"Every process at nice {args.nice}. " if args.nice else "")
        + f"Direct baseline: p50 {baseline['p50']:.3f} ms, p99 {baseline['p99']:.3f} ms, "
        f"TTFC p50 {baseline['ttfc_p50']:.3f} ms"
        + (f" (mean of the runs before and after the proxies: p50 "
           f"{direct['latency']['p50']:.3f} / {again['latency']['p50']:.3f} ms)"
           if again else "")
        + (f"; direct closed loop (generator + upstream on one core: the rig's ceiling) "
           f"{direct['closed_rps']:,.0f} req/s" if direct.get("closed_rps") else "")
        + ".",
        "",
        table,
        "",
    ]
    large = large_table(rows)
    if large:
        lines += [(f"Large bodies, open loop {args.large_rate:g} req/s for {args.large_duration:g} s "
                   "each: a chat prompt of about 100k tokens (405 KB) and a 64-row, 64-feature "
                   "classifier batch (Open Inference Protocol); added to direct's latency with "
                   "the same body."), "", large, ""]
    other = [r[k]["other_load_cores"] for r in results.values() for k in ("open", "stream", "closed")
             if isinstance(r.get(k), dict) and "other_load_cores" in r[k]]
    if other:
        lines += [(f"Other processes on the machine used {min(other):.2f}–{max(other):.2f} cores "
                   "during the measured windows (2-core machine shared with other work)."), ""]
    notes = [w for r in results.values() for w in r.get("warnings", [])]
    notes += [f"{r['label']} logged: {w}" for r in results.values() for w in r.get("log_warnings", [])]
    if notes:
        lines += ["Warnings:", ""] + [f"- {n}" for n in notes] + [""]
    if skipped:
        lines += ["Skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + ".", ""]
    split = process_split(results)
    if split:
        lines += [f"- {line}" for line in split] + [""]
    lines += ["Goals:", ""]
    for label, ok, detail in checks:
        mark = "PASS" if ok else ("n/a" if ok is None else "FAIL")
        lines.append(f"- **{mark}** {label}: {detail}")
    lines += ["", f"Raw data: `{rel(json_path)}` (gitignored)."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few seconds per target (development)")
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help=f"comma-separated subset of {','.join(ALL_TARGETS)} (direct always runs)")
    p.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM proxy")
    p.add_argument("--no-redis", action="store_true", help="skip ModelFence with Redis limits")
    p.add_argument("--rate", type=float, default=200.0, help="open-loop requests/s")
    p.add_argument("--duration", type=float, default=None, help="open-loop seconds (20)")
    p.add_argument("--stream-duration", type=float, default=None, help="streaming seconds (10)")
    p.add_argument("--closed-duration", type=float, default=None,
                   help="closed-loop seconds (10); 0 skips the closed loop")
    p.add_argument("--concurrency", type=int, default=48, help="closed-loop connections")
    p.add_argument("--large-rate", type=float, default=20.0,
                   help="open-loop requests/s with the large bodies (100k-token prompt, "
                        "64-row batch)")
    p.add_argument("--large-duration", type=float, default=None,
                   help="seconds per large body (10); 0 skips them")
    p.add_argument("--warmup", type=float, default=None, help="unmeasured seconds per run (2)")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="don't pin proxy / generator to cores with taskset")
    p.add_argument("--nice", type=int, default=0,
                   help="run every started process at this nice level; a negative one (root) "
                        "shields the measurements from other work on a shared machine, at "
                        "that work's expense")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="first wait up to this long for other work to calm down")
    p.add_argument("--quiet-cores", type=float, default=0.5,
                   help="'calm' for --wait-quiet: fewer cores than this busy (0.5)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    # modelfence.config.ProcessPriority's values, spelled out: this script also measures
    # older checkouts (PYTHONPATH), whose config may not have it.
    p.add_argument("--detector-priority", choices=("low", "idle", "normal"),
                   help="modelfence-detection: detection.process_priority (default: the config's)")
    p.add_argument("--litellm-venv", type=Path, default=DEFAULT_LITELLM_VENV,
                   help=f"virtualenv for LiteLLM, created on first use ({DEFAULT_LITELLM_VENV})")
    p.add_argument("--profile", action="store_true",
                   help="one more closed-loop run per ModelFence target under py-spy")
    p.add_argument("--profile-duration", type=float, default=None, help="seconds (10)")
    p.add_argument("--from-json", type=Path, metavar="PATH",
                   help="measure nothing: re-render the table of a saved run (results JSON)")
    p.add_argument("--no-docs", action="store_true", help="don't update docs/BENCHMARKS.md")
    p.add_argument("--docs", type=Path, default=DOCS)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"duration": (3, 20), "stream_duration": (2, 10), "closed_duration": (3, 10),
                "large_duration": (3, 10),
                "warmup": (0.5, 2), "profile_duration": (4, 10)}
    for key, (q, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, q if quick else full)
    return args


def wait_for_quiet(limit_s: float, cores: float) -> None:
    """Wait (up to limit_s) until other work uses less than `cores` cores for 5 s."""
    start = time.monotonic()
    told = -60.0
    while True:
        busy = psutil.cpu_percent(interval=5) / 100 * (os.cpu_count() or 1)
        waited = time.monotonic() - start
        if busy < cores:
            say(f"machine quiet enough: {busy:.2f} cores busy")
            return
        if waited > limit_s:
            say(f"still {busy:.2f} cores busy after {limit_s:g}s of waiting: running anyway")
            return
        if waited - told >= 60:
            told = waited
            say(f"{busy:.2f} cores busy with other work; waiting for < {cores:g} "
                f"(at most {limit_s - waited:.0f}s more)")


def process_split(results: dict[str, dict[str, Any]]) -> list[str]:
    """Each ModelFence target's CPU split between the gateway process and its children (the
    detector child of ``modelfence-detection``), from the saved per-window CPU times."""
    lines = []
    for r in results.values():
        closed = r.get("closed") or {}
        if "proxy_main" not in closed.get("cpu_s", {}):
            continue
        shares = [f"{(run['cpu_s']['proxy'] - run['cpu_s']['proxy_main']) / run['window_s']:.1%}"
                  for run in (r.get(k) for k in ("closed", "open", "stream"))
                  if isinstance(run, dict) and "proxy_main" in run.get("cpu_s", {})]
        own = closed["cpu_s"]["proxy_main"] / max(1, closed["ok"]) * 1e6
        lines.append(f"{r['label']}: the gateway process's own CPU per closed-loop request "
                     f"{own:.0f} µs; its child processes used {' / '.join(shares)} of a core "
                     "in the closed-loop / open-loop / streaming windows")
    return lines


def publish(rows: list[dict[str, Any]], section: str, skipped: dict[str, str], rate: float,
            json_path: Path, args: argparse.Namespace,
            results: dict[str, dict[str, Any]]) -> None:
    print()
    print(markdown_table(rows, rate))
    print()
    for label, ok, detail in goals(rows, rate):
        print(f"{'PASS' if ok else ('n/a ' if ok is None else 'FAIL')}  {label}: {detail}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    for line in process_split(results):
        print(line)
    print(f"\nraw results: {rel(json_path)}")
    if not args.no_docs:
        write_docs(section, args.docs)
        print(f"table written to {rel(args.docs)}")


def rerender(path: Path, cli: argparse.Namespace) -> int:
    data = json.loads(path.read_text())
    args = argparse.Namespace(**data["args"])
    results = data["results"]
    table_results = {k: v for k, v in results.items() if not k.startswith("_")}
    rows = build_rows(table_results, data["baseline"])
    section = report(table_results, results.get("_direct_again"), args, data["machine"],
                     data["command"], path.resolve(), data["baseline"], data["skipped"])
    publish(rows, section, data["skipped"], args.rate, path.resolve(), cli, table_results)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    global NICE
    # Stop cleanly (every started process stopped) on Ctrl-C or kill, also when started in
    # the background, where the shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    args = parse_args(argv)
    NICE = args.nice
    if args.from_json:
        return rerender(args.from_json, args)
    command = "python bench/overhead.py" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(wanted) - set(ALL_TARGETS)
    if unknown:
        print(f"unknown target(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if "direct" not in wanted:
        wanted.insert(0, "direct")
    skipped: dict[str, str] = {}
    if args.no_litellm and "litellm" in wanted:
        wanted.remove("litellm")
        skipped["litellm"] = "--no-litellm"
        say("LiteLLM skipped (--no-litellm)")
    if args.no_redis and "modelfence-redis" in wanted:
        wanted.remove("modelfence-redis")
        skipped["modelfence-redis"] = "--no-redis"
    if "modelfence-redis" in wanted:
        try:
            import redis

            redis.Redis.from_url(args.redis_url, socket_timeout=2).ping()
        except Exception as exc:  # noqa: BLE001 - any failure means: skip with the reason
            wanted.remove("modelfence-redis")
            skipped["modelfence-redis"] = f"Redis at {args.redis_url} unreachable: {exc}"
            say(f"ModelFence with Redis limits skipped: {skipped['modelfence-redis']} "
                "(start it with `redis-server --daemonize yes --save ''`)")
    if args.pin and (os.cpu_count() or 1) < 2:
        say("fewer than 2 cores: not pinning")
        args.pin = False

    if args.wait_quiet > 0:
        wait_for_quiet(args.wait_quiet, args.quiet_cores)

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    info = machine()
    info["date"] = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    info["load_avg_start"] = info.pop("load_avg")
    say(f"{info['cpu']}, {info['cores']} cores, Python {info['python']}; "
        f"targets: {', '.join(wanted)}")

    workdir = Path(tempfile.mkdtemp(prefix="modelfence-bench-"))
    results: dict[str, dict[str, Any]] = {}
    upstream_url, upstream = start_upstream(workdir, args.pin)
    redis_pid = redis_server_pid()
    say(f"fake upstream on {upstream_url} (pid {upstream.pid}); logs in {workdir}")
    failed: dict[str, str] = {}
    try:
        for name in wanted:
            target: Target | None = None
            try:
                if name == "direct":
                    target = Target("direct", "direct (no proxy)", upstream_url)
                elif name == "floor":
                    target = start_floor(upstream_url, workdir, args.pin)
                elif name in ("modelfence-memory", "modelfence-detection"):
                    target = start_modelfence(upstream_url, "memory", workdir, args.pin,
                                              name == "modelfence-detection",
                                              detector_priority=args.detector_priority)
                elif name == "modelfence-redis":
                    target = start_modelfence(upstream_url, args.redis_url, workdir, args.pin, False)
                elif name == "litellm":
                    target = start_litellm(upstream_url, workdir, args.pin, args.litellm_venv)
                assert target is not None
                verify(target)
                results[name] = measure_target(target, args, upstream, redis_pid,
                                               large=name in LARGE_TARGETS)
                if args.profile and name.startswith("modelfence"):
                    results[name]["profile"] = profile_target(target, args, stamp)
            except Exception as exc:  # noqa: BLE001 - one broken target must not sink the rest
                failed[name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                say(f"{name} FAILED: {exc}")
            finally:
                if target is not None and target.proc is not None:
                    target.proc.stop()
                    if name.startswith("modelfence") and name in results:
                        logged = log_warnings(target.proc)
                        if logged:
                            results[name]["log_warnings"] = logged
                            say(f"{name} logged warnings: {logged}")
        if not args.quick and "direct" in results and len(results) > 1:
            say("direct again (drift check of the baseline)")
            again = Target("direct", "direct (again)", upstream_url)
            saved = args.closed_duration
            args.closed_duration = 0
            try:
                results["_direct_again"] = measure_target(again, args, upstream, redis_pid)
            finally:
                args.closed_duration = saved
    finally:
        upstream.stop()

    if "direct" not in results:
        print("the direct baseline failed; nothing to compare", file=sys.stderr)
        return 1
    d = results["direct"]
    runs = [d] + ([results["_direct_again"]] if "_direct_again" in results else [])
    baseline = {
        "p50": sum(r["latency"]["p50"] for r in runs) / len(runs),
        "p99": sum(r["latency"]["p99"] for r in runs) / len(runs),
        "ttfc_p50": sum(r["stream_ttfc"]["p50"] for r in runs) / len(runs),
        "ttfc_p99": sum(r["stream_ttfc"]["p99"] for r in runs) / len(runs),
    }
    skipped.update({k: f"failed: {v}" for k, v in failed.items()})
    table_results = {k: v for k, v in results.items() if not k.startswith("_")}
    json_path = RESULTS / f"overhead-{stamp}.json"
    rows = build_rows(table_results, baseline)
    json_path.write_text(json.dumps({"command": command, "machine": info, "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "baseline": baseline, "rows": rows, "skipped": skipped, "results": results,
        "load_avg_end": os.getloadavg()}, indent=1))
    section = report(table_results, results.get("_direct_again"), args, info, command,
                     json_path, baseline, skipped)
    publish(rows, section, skipped, args.rate, json_path, args, table_results)
    if failed:
        say(f"logs of the failed target(s) kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: every process the benchmark started has been stopped",
              file=sys.stderr)
        sys.exit(130)

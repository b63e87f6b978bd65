"""Backend choice by measurement: policy ``"autotune"`` times every backend that can serve a site,
at compile time on the GPU, on the site's shapes, and caches the fastest on disk; ``"auto"`` takes a
cached choice when there is one.

The cache (``$DSGRAPH_CACHE_DIR/autotune.json``, default ``~/.cache/dsgraph/autotune.json``) maps a
key — op, the arguments' dtypes, shapes and strides, the scalar arguments, whether the site needs
gradients, the device's name and the torch / triton / tilelang / dsgraph versions (dsgraph's
includes a hash of its kernel sources) — to the winner and every candidate's time. An entry of
another version or device is simply another key. A file that does not parse, an entry of the wrong
form, or a cached winner that cannot serve the site any more is ignored with a warning and, under
``"autotune"``, measured again and rewritten; writes are atomic (a temporary file renamed over the
cache, under a lock so concurrent processes do not lose each other's entries).

The timer is injectable (:func:`use_timer`) so the cache logic is tested without a GPU.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import pathlib
import tempfile
import time
from typing import Any, Callable, Iterator, Optional

import torch

log = logging.getLogger("dsgraph")

CACHE_ENV = "DSGRAPH_CACHE_DIR"
_FORMAT = 1
# A candidate whose first call takes longer than this many times the best so far is not timed again.
_GIVE_UP = 10.0
_WARMUP_MS = 100.0  # untimed calls per candidate first: as many as fit, 1..1000
_BUDGET_MS = 200.0  # timed calls per candidate: as many as fit, 1..50


class CannotTime(RuntimeError):
    """The timer cannot measure anything here (e.g. no GPU): autotune keeps the policy's order."""


# (op, backend, args, requires_grad, best_ms so far or None) -> ms per call
Timer = Callable[[str, str, dict, bool, Optional[float]], float]


def cache_path() -> pathlib.Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "dsgraph")
    return pathlib.Path(root) / "autotune.json"


# --- the key --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def versions() -> dict[str, Optional[str]]:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    here = pathlib.Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted([*here.glob("kernels/*.py"), *here.glob("ops/*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    return {"torch": torch.__version__, "triton": version("triton"), "tilelang": version("tilelang"),
            "dsgraph": f"{version('dsgraph')}+{digest.hexdigest()[:12]}"}


def _describe(value) -> Any:
    if isinstance(value, torch.Tensor):
        return [str(value.dtype).removeprefix("torch."), list(value.shape), list(value.stride())]
    if isinstance(value, float):
        return repr(value)  # exact
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)


def device_name(args: dict) -> str:
    device = next((v.device for v in args.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def cache_key(op: str, args: dict, requires_grad: bool) -> str:
    return json.dumps({"op": op, "grad": requires_grad, "device": device_name(args), "versions": versions(),
                       "args": {name: _describe(v) for name, v in sorted(args.items())}}, sort_keys=True)


# --- the cache file -------------------------------------------------------------------------------

def _load(path: pathlib.Path) -> dict:
    """The cache's entries; a missing file is empty, an unreadable one is empty with a warning."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.warning("dsgraph autotune: cannot read %s (%s); ignoring it", path, exc)
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("entries"), dict):
            raise ValueError(f"not a format-{_FORMAT} dsgraph autotune cache")
    except ValueError as exc:
        log.warning("dsgraph autotune: ignoring corrupt cache %s (%s); it will be rewritten", path, exc)
        return {}
    return data["entries"]


def _valid_entry(entry) -> Optional[str]:
    """None if ``entry`` has the form :func:`_store` writes, else what is wrong."""
    if not isinstance(entry, dict) or not isinstance(entry.get("backend"), str):
        return "no backend"
    timings = entry.get("timings")
    if not isinstance(timings, dict) or not all(isinstance(b, str) for b in timings):
        return "no timings"
    best = timings.get(entry["backend"])
    if not isinstance(best, (int, float)) or not math.isfinite(best) or best <= 0:
        return f"the winner's time {best!r} is not a positive number"
    if any(isinstance(t, (int, float)) and t < best for t in timings.values()):
        return "the winner is not the fastest candidate"
    return None


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
    import fcntl
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _store(path: pathlib.Path, key: str, entry: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            entries = _load(path)
            entries[key] = entry
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"format": _FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
    except OSError as exc:  # a read-only home must not fail the compile
        log.warning("dsgraph autotune: cannot write %s (%s); the choice is not cached", path, exc)


# --- timing ---------------------------------------------------------------------------------------

def _materialize(fake, requires_grad: bool) -> Any:
    """A real tensor with ``fake``'s dtype, shape, strides and device (random values; integer
    tensors are zeros, a valid index everywhere). With ``requires_grad`` every floating tensor is a
    leaf that needs gradients (a runner detaches the arguments its op never differentiates)."""
    if not isinstance(fake, torch.Tensor):
        return fake
    span = 1 + sum((n - 1) * s for n, s in zip(fake.shape, fake.stride()) if n > 0)
    if fake.dtype.is_floating_point:
        flat = torch.randn(span, dtype=fake.dtype, device=fake.device)
    else:
        flat = torch.zeros(span, dtype=fake.dtype, device=fake.device)
    real = flat.as_strided(fake.shape, fake.stride())
    if requires_grad and fake.dtype.is_floating_point:
        real = real.detach().requires_grad_(True)
    return real


def _mean_ms(step: Callable[[], Any], calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def _bench(step: Callable[[], Any], best_ms: Optional[float]) -> float:
    step()  # compiles
    torch.cuda.synchronize()
    first = _mean_ms(step, 1)
    if best_ms is not None and first > _GIVE_UP * best_ms:
        return first
    # Timed straight after its compile (the GPU idle meanwhile), the first candidate of a site read up
    # to 2x slow at 0.1-0.7 ms steps on an H100; later candidates and longer steps did not.
    for _ in range(max(1, min(1000, int(_WARMUP_MS / max(first, 1e-3))))):
        step()
    return _mean_ms(step, max(1, min(50, int(_BUDGET_MS / max(first, 1e-3)))))


@functools.lru_cache(maxsize=None)
def _compiled(run: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(run, dynamic=False, fullgraph=True)


@contextlib.contextmanager
def compiling_runners() -> Iterator[None]:
    """The settings runners are compiled and timed under.

    - Their backward is built with their forward: lazily, it would compile in autograd's CUDA thread,
      which waits for Dynamo's compile lock, held by this thread (the site's graph is being compiled)
      while it waits for the backward: a deadlock.
    - Every (runner, shape, grad mode) is a compiled entry of the runner's one code object: past
      Dynamo's default limit of 8 the fullgraph compile raises and the candidate would lose as failed.
    """
    from torch._dynamo import config as dynamo_config
    from torch._functorch import config as functorch_config
    limits = {name: 2 ** 20 for name in ("recompile_limit", "accumulated_recompile_limit")
              if hasattr(dynamo_config, name)}
    with functorch_config.patch(force_non_lazy_backward_lowering=True), dynamo_config.patch(**limits):
        yield


def timing_step(run: Callable[..., Any], args: dict, requires_grad: bool) -> Callable[[], Any]:
    """One call of ``run`` (a ``KernelImpl.run``) on the real tensors ``args``, compiled alone as the
    rewritten graph runs it: through AOTAutograd and Inductor's wrapper, whose per-call CPU cost decides
    the steps that are launch-bound (a custom op's dispatch and Python glue against Inductor's own
    kernels). With ``requires_grad`` the step runs the backward too and returns the leaves' gradients.
    Call it under :func:`compiling_runners`."""
    compiled = _compiled(run)
    leaves = [v for v in args.values() if isinstance(v, torch.Tensor) and v.requires_grad]

    def step():
        if not requires_grad:
            with torch.no_grad():
                return compiled(**args)
        out = compiled(**args)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(o, torch.Tensor) and o.requires_grad]
        return torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs], allow_unused=True)
    return step


def time_on_gpu(op: str, backend: str, args: dict, requires_grad: bool, best_ms: Optional[float] = None) -> float:
    """Milliseconds per call of what the rewritten graph runs for ``backend`` at a site
    (:func:`timing_step` of ``KernelImpl.run``), forward or forward + backward, on random inputs of
    the site's layout."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from .registry import kernel
    device = next((v.device for v in args.values() if isinstance(v, torch.Tensor)), None)
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        raise CannotTime("no GPU")
    impl = kernel(op, backend)
    if impl.run is None:
        raise CannotTime(f"the {backend} kernel of dsgraph::{op} declares no runner to time")
    with unset_fake_temporarily(), torch.cuda.device(device), compiling_runners():
        real = {name: _materialize(v, requires_grad) for name, v in args.items()}
        try:
            return _bench(timing_step(impl.run, real, requires_grad), best_ms)
        finally:
            real.clear()
            torch.cuda.empty_cache()


_TIMER: Timer = time_on_gpu


@contextlib.contextmanager
def use_timer(timer: Timer) -> Iterator[None]:
    """Time candidates with ``timer(op, backend, args, requires_grad, best_ms) -> ms`` instead of on
    the GPU (it raises :class:`CannotTime` where it cannot measure anything)."""
    global _TIMER
    previous, _TIMER = _TIMER, timer
    try:
        yield
    finally:
        _TIMER = previous


# --- the choice -----------------------------------------------------------------------------------

def tune(op: str, usable: list[str], args: dict, *, requires_grad: bool, measure: bool,
         site: str) -> tuple[str, dict, str]:
    """``(backend, timings, note)`` for a site that the backends ``usable`` (in the policy's order)
    can serve: a valid cached choice; else, with ``measure``, the fastest of them (then cached);
    else the first."""
    path = cache_path()
    key = cache_key(op, args, requires_grad)
    entry = _load(path).get(key)
    if entry is not None:
        problem = _valid_entry(entry)
        if problem is None and entry["backend"] not in usable:
            problem = f"its backend {entry['backend']} cannot serve the site now"
        if problem is None:
            return entry["backend"], dict(entry["timings"]), "cached"
        log.warning("dsgraph autotune: ignoring the cached choice for %s at %s (%s)%s", op, site, problem,
                    "; measuring again" if measure else "")
    if not measure:
        return usable[0], {}, ""
    if len(usable) == 1:
        return usable[0], {}, "autotune: the only candidate"
    timings: dict[str, "float | str"] = {}
    best: Optional[float] = None
    log.info("dsgraph autotune: timing %s for %s at %s (%s; a candidate's first call compiles it)",
             ", ".join(usable), op, site, "forward + backward" if requires_grad else "forward")
    for backend in usable:
        started = time.perf_counter()
        try:
            ms = float(_TIMER(op, backend, args, requires_grad, best))
        except CannotTime as exc:
            return usable[0], {}, f"autotune: {exc}, the policy's order"
        except Exception as exc:  # noqa: BLE001  a candidate that fails to run loses, with the reason shown
            message = str(exc).splitlines()[0] if str(exc) else ""
            timings[backend] = f"failed ({type(exc).__name__}: {message[:120]})"
            log.warning("dsgraph autotune: %s backend %s failed when timed at %s: %s", op, backend, site, exc)
            continue
        timings[backend] = ms
        best = ms if best is None else min(best, ms)
        log.info("dsgraph autotune: %s at %s: %s %.3g ms (%.1f s with compiling and timing)", op, site, backend, ms,
                 time.perf_counter() - started)
    if best is None:
        return usable[0], timings, "autotune: no candidate ran, the policy's order"
    winner = next(b for b in usable if timings.get(b) == best)
    _store(path, key, {"backend": winner, "timings": timings, "site": site,
                       "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    log.info("dsgraph autotune: %s at %s -> %s (%s)", op, site, winner,
             ", ".join(f"{b} {t:.3g} ms" if isinstance(t, float) else f"{b} {t}" for b, t in timings.items()))
    return winner, timings, "measured"

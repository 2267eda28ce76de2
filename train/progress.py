"""Progress bars with an ETA (tqdm) for the long loops: NUTS warm-up and sampling per chain, flow
training. Shown only when stderr is a terminal (quiet in logs and CI); POSTFLOW_PROGRESS=1 or 0
forces them on or off. The one-line stage summaries are printed either way."""

import contextlib
import os
import sys


def enabled() -> bool:
    env = os.environ.get("POSTFLOW_PROGRESS")
    if env is not None:
        return env.strip().lower() not in ("", "0", "false", "no", "off")
    return sys.stderr.isatty()


class _Quiet:
    """Stands in for a bar when bars are off: every method is a no-op."""

    def update(self, n=1):
        pass

    def reset(self, total=None):
        pass

    def set_description(self, desc=None):
        pass

    def set_postfix_str(self, s=""):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def bar(total, desc, position=None):
    """A tqdm bar on stderr (or a silent stand-in when bars are off)."""
    if not enabled():
        return _Quiet()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, position=position, leave=False, dynamic_ncols=True,
                mininterval=0.5, file=sys.stderr, unit="step")


@contextlib.contextmanager
def scan_steps(pbar):
    """While active, every step of the outermost `jax.lax.scan` traced in the block calls
    `pbar.update(1)` on the host (a `jax.debug.callback` next to the unchanged step body; scans
    nested inside that body are left alone). Used for blackjax's warm-up, whose scan is not ours.
    A no-op for the quiet stand-in, so runs without a terminal trace exactly the plain code."""
    if isinstance(pbar, _Quiet):
        yield
        return
    import jax
    original, depth = jax.lax.scan, [0]

    def tick():
        pbar.update(1)

    def scan(f, init, xs=None, length=None, **kwargs):
        if depth[0]:
            return original(f, init, xs, length, **kwargs)

        def body(carry, x):
            depth[0] += 1
            try:
                out = f(carry, x)
            finally:
                depth[0] -= 1
            jax.debug.callback(tick)
            return out

        return original(body, init, xs, length, **kwargs)

    jax.lax.scan = scan
    try:
        yield
    finally:
        jax.lax.scan = original

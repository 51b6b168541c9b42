"""Two costs of the CPU interpreters that have nothing to do with the kernels they run, removed for the
tests (the kernels, their launches and what the interpreters compute are unchanged):

- **The CUDA simulator** runs each thread of a block as a Python thread, and its block manager
  (``BlockManager.run``) polls them in a loop that holds the GIL until the interpreter's switch
  interval (5 ms) takes it away: the simulated threads wait most of the time. Yielding the GIL at
  each poll (``BlockThread.is_alive``, which the loop calls for every live thread) makes the numba_cuda
  tests about 4x faster.
- **Triton's interpreter** patches ``triton.language`` (its builtins listed by ``inspect.getmembers``)
  at every launch, undone when the launch ends, and again at every call of a ``@triton.jit`` helper
  inside the kernel, hundreds of times a launch, where it finds everything patched already. Here a
  helper call patches only the language of a module the launch has not patched yet (``tl.zeros`` is
  a helper of ``triton.language`` itself), and the builtins of a module are listed once and re-checked
  by name (the triton tests about 1.8x faster).

Each is applied only where the interpreter has the shape it is written against, else the interpreter
runs as it comes.
"""

import inspect
import threading
import time


def _yield_in_the_simulators_poll():
    try:
        from numba.cuda.simulator import kernel
    except ImportError:
        return
    thread = getattr(kernel, "BlockThread", None)
    if thread is None or not issubclass(thread, threading.Thread) or "is_alive" in vars(thread):
        return

    def is_alive(self):
        time.sleep(0)  # releases the GIL: the block's threads run while the manager polls
        return threading.Thread.is_alive(self)

    thread.is_alive = is_alive


def _patch_triton_less():
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_attr, patch_lang = getattr(interpreter, "_patch_attr", None), getattr(interpreter, "_patch_lang", None)
    is_builtin = getattr(tl.core, "is_builtin", None)
    if None in (patch_attr, patch_lang, is_builtin) or not hasattr(interpreter, "_patch_builtin"):
        return
    builtins = {}  # id(module or class) -> names of its builtins, listed the first time (unpatched)

    def _patch_builtin(pkg, builder, scope):
        names = builtins.get(id(pkg))
        if names is None:
            names = builtins[id(pkg)] = [name for name, member in inspect.getmembers(pkg) if is_builtin(member)]
        for name in names:
            member = getattr(pkg, name, None)
            if is_builtin(member):  # not already patched by the launch around this helper call
                patch_attr(pkg, name, member, builder, scope)

    patched = set()  # ids of the module globals whose triton.language the running launch has patched

    class Launch:  # the launch's scope: its restore ends the launch
        def __init__(self, scope):
            self.scope = scope

        def restore(self):
            patched.clear()
            self.scope.restore()

    class Done:
        def restore(self):
            pass

    def _patch_lang(fn):
        module = id(fn.__globals__)
        if not patched:  # a launch (the interpreter restores what it patched when the launch ends)
            scope = Launch(patch_lang(fn))
            patched.add(module)
            return scope
        if module in patched:  # a helper of a module this launch has patched
            return Done()
        scope = patch_lang(fn)  # a helper of another module: patched as the interpreter does
        patched.add(module)
        return scope

    interpreter._patch_builtin = _patch_builtin
    interpreter._patch_lang = _patch_lang


def speed_up():
    """Apply them (call with the interpreters switched on, before any kernel runs)."""
    _yield_in_the_simulators_poll()
    _patch_triton_less()

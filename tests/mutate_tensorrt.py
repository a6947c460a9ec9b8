"""Mutation check for the TensorRT code and its fakes (issue 17), run by hand:

    python tests/mutate_tensorrt.py

Each entry breaks one rule of the real TensorRT / CUDA in our code (scratch of 1 byte,
capture on stream 0, no plugin registration, a tensor without an address, ...), runs the
fake-backed tests, and restores the file. Every mutation must be caught: a fake that
lets one pass is not strict enough. Prints one line per mutation; exits 1 if any is
missed. Takes a few minutes (one pytest run per mutation).
"""
# ruff: noqa: E501  (each mutation is one exact source line and its replacement)
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
MUTATIONS = [  # (what breaks, file, exact source, replacement)
 ("scratch size 1 byte", "runtime/backends/tensorrt.py", "            context.set_device_memory(ptr, size)", "            context.set_device_memory(ptr, 1)"),
 ("scratch alloc 1 byte", "runtime/backends/tensorrt.py", "self.scratch_ptr = self.cuda.malloc(self.scratch_need)", "self.scratch_ptr = self.cuda.malloc(1)"),
 ("capture on stream 0", "runtime/backends/tensorrt.py", "cuda.begin_capture(device.stream)", "cuda.begin_capture(0)"),
 ("no plugin init (runtime)", "runtime/backends/tensorrt.py", '        register_plugins()\n', ""),
 ("no plugin init (build; with the native flag only the call log sees it)", "engines/tensorrt_build.py", '    register_plugins()  # before parsing: a graph may still need one\n', ""),
 ("no native instancenorm flag (build)", "engines/tensorrt_build.py", "        parser.set_flag(native)", "        pass"),
 ("missing output tensor address", "runtime/backends/tensorrt.py", "                if not context.set_tensor_address(t.name, dev):", "                if t.name != 'noise_pred' and not context.set_tensor_address(t.name, dev):"),
 ("no clear_last_error", "runtime/backends/tensorrt.py", "            cuda.clear_last_error()  # else the next call's error check reports it\n", ""),
 ("plan written after the timing cache", "engines/tensorrt_build.py", "    with open(out, \"wb\") as f:\n        f.write(plan)  # IHostMemory is a buffer\n    del plan\n    _save_timing_cache(config, timing_cache, warn, known_bad=bad_timing)\n", "    _save_timing_cache(config, timing_cache, lambda m: (_ for _ in ()).throw(OSError(m)))\n    with open(out, \"wb\") as f:\n        f.write(plan)\n"),
 ("corrupt timing cache not handled", "engines/tensorrt_build.py", "    if tcache is not None and config.set_timing_cache(tcache, False):", "    if config.set_timing_cache(tcache, False):"),
 ("build options not in the key", "engines/build.py", "                                              opts.tensorrt.key(rows)), build))", "                                              cache.ANY), build))"),
 ("v2 size with `or` fallback", "runtime/backends/tensorrt.py", "        self.scratch_bytes = int(engine.device_memory_size_v2\n                                 if hasattr(engine, \"device_memory_size_v2\")\n                                 else engine.device_memory_size)", "        self.scratch_bytes = int(getattr(engine, \"device_memory_size_v2\", None) or engine.device_memory_size)"),
 ("load demands opt-shape plan", "runtime/backends/tensorrt_cached.py", "        path = self._lookup(opt) or self._find(None)", "        path = self._lookup(opt)"),
 ("graph kept after re-allocation", "runtime/backends/tensorrt.py", "        self._drop_graph()\n        self._free_buffers()\n        context, cuda", "        self._free_buffers()\n        context, cuda"),
 ("sync inside capture", "runtime/backends/tensorrt.py", "            self.graph = cuda.end_capture(device.stream)", "            cuda.sync(device.stream)\n            self.graph = cuda.end_capture(device.stream)"),
 ("enqueue on stream 0 while capturing", "runtime/backends/tensorrt.py", "            if not context.execute_async_v3(stream):\n                raise CudaError(", "            if not context.execute_async_v3(0):\n                raise CudaError("),
 ("no plan kept deserialized on a swap", "runtime/backends/tensorrt_cached.py", "        if current[0] is not None and self.keep_plans > 1:", "        if False:"),
 ("plan read into bytes", "runtime/backends/tensorrt.py", "                return device.runtime.deserialize_cuda_engine(m)", "                return device.runtime.deserialize_cuda_engine(bytes(m))"),
 ("given not reset by allocate (engine base)", "runtime/engine.py", "        self.shapes, self.given = None, set()\n", "        self.shapes = None\n"),
 ("never-given inputs run (engine base)", "runtime/engine.py", "        if len(self.given) != len(self._dtypes):", "        if False:"),
 ("11 not refused", "runtime/tensorrt_env.py", "    why = unsupported(str(getattr(trt, \"__version__\", \"?\")))\n    if why:\n        return why", "    pass"),
]
TESTS = ["tests/test_tensorrt_backend.py", "tests/test_engines_build.py", "tests/test_engine_base.py"]


def main() -> int:
    """Apply each mutation, run TESTS, restore the file; 1 if any mutation was missed.
    Only from the command line: importing this module must never edit the source."""
    bad = 0
    for name, f, old, new in MUTATIONS:
        p = ROOT / f
        orig = p.read_text()
        if old not in orig:
            print(f"!! {name}: pattern not found (the code changed: update this entry)")
            bad += 1
            continue
        p.write_text(orig.replace(old, new, 1))
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                *TESTS], capture_output=True, text=True, cwd=ROOT)
        finally:
            p.write_text(orig)
        failed = r.returncode != 0
        print(f"{'caught' if failed else 'MISSED'}: {name}")
        bad += not failed
    print("missed", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""TensorRT engines: is there TensorRT and a GPU here, build a strongly typed engine from an ONNX model,
read its inspector JSON, and time it on the GPU with CUDA events.

Every TensorRT and CUDA import happens inside a function: importing this module costs nothing and
works where neither exists. :func:`availability` says what is missing in words a run can be tagged
with; nothing here ever falls back to the CPU and calls the result a GPU figure.

TensorRT 11 builds every network strongly typed (each layer runs in the type its ONNX tensors carry;
``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is accepted and ignored there) and has no INT8/FP16
builder flags; TensorRT 10 needs the flag. It is always set, and no precision flag ever is: the types
are the model's.

CUDA for buffers, streams and events comes from cuda-python (``cuda.bindings.runtime``, or
``cuda.cudart`` in older releases; what TensorRT's own Python samples use) or, without it, from
PyTorch's ``torch.cuda``.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.errors import BackendUnavailable, ModelError, fail
from pipeline.execution import environment

NOT_IMPORTABLE = "tensorrt not importable"
NO_DEVICE = "no CUDA device"


@dataclass(frozen=True)
class Availability:
    """Whether engines can be built and timed here; when not, every reason (TensorRT, the GPU)."""

    reasons: tuple[str, ...] = ()
    tensorrt: str | None = None  # the importable TensorRT's version
    device: str = ""  # e.g. "NVIDIA A100 80GB PCIe (sm_80), driver 12040, CUDA runtime 12040, via cuda-python"

    @property
    def ok(self) -> bool:
        return not self.reasons

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


class Cuda(Protocol):
    """The few CUDA runtime calls an engine needs: device memory, a stream, events around a launch."""

    name: str

    def device_count(self) -> int: ...
    def describe(self) -> str: ...
    def alloc(self, nbytes: int) -> int: ...
    def upload(self, ptr: int, host: np.ndarray) -> None: ...
    def stream(self) -> int: ...
    def elapsed_ms(self, stream: int, launch: Callable[[], None]) -> float: ...
    def synchronize(self, stream: int) -> None: ...
    def release(self) -> None: ...


class _CudaPython:
    """cuda-python's runtime API; every call returns ``(error, *values)``."""

    name = "cuda-python"

    def __init__(self, rt: Any):
        self.rt = rt
        self._ptrs: list[int] = []
        self._streams: list[Any] = []
        self._events: list[Any] = []
        self._stream_objects: dict[int, Any] = {}

    def call(self, result: Any) -> Any:
        result = result if isinstance(result, tuple) else (result,)
        err, values = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            name = self.rt.cudaGetErrorName(err)[1]
            fail(BackendUnavailable, f"CUDA call failed: {name.decode() if isinstance(name, bytes) else name}")
        return values[0] if len(values) == 1 else values

    def device_count(self) -> int:
        err, count = self.rt.cudaGetDeviceCount()
        return int(count) if err == self.rt.cudaError_t.cudaSuccess else 0

    def describe(self) -> str:
        props = self.call(self.rt.cudaGetDeviceProperties(0))
        name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else props.name
        driver = self.call(self.rt.cudaDriverGetVersion())
        runtime = self.call(self.rt.cudaRuntimeGetVersion())
        return f"{name} (sm_{props.major}{props.minor}), driver CUDA {driver}, CUDA runtime {runtime}, via {self.name}"

    def alloc(self, nbytes: int) -> int:
        ptr = int(self.call(self.rt.cudaMalloc(max(nbytes, 1))))
        self._ptrs.append(ptr)
        return ptr

    def upload(self, ptr: int, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.call(self.rt.cudaMemcpy(ptr, host.ctypes.data, host.nbytes, kind))

    def stream(self) -> int:
        s = self.call(self.rt.cudaStreamCreate())
        self._streams.append(s)
        handle = int(s)
        self._stream_objects[handle] = s
        return handle

    def elapsed_ms(self, stream: int, launch: Callable[[], None]) -> float:
        if not self._events:
            self._events = [self.call(self.rt.cudaEventCreate()) for _ in range(2)]
        start, end = self._events
        s = self._stream_objects[stream]
        self.call(self.rt.cudaEventRecord(start, s))
        launch()
        self.call(self.rt.cudaEventRecord(end, s))
        self.call(self.rt.cudaEventSynchronize(end))
        return float(self.call(self.rt.cudaEventElapsedTime(start, end)))

    def synchronize(self, stream: int) -> None:
        self.call(self.rt.cudaStreamSynchronize(self._stream_objects[stream]))

    def release(self) -> None:
        for e in self._events:
            self.rt.cudaEventDestroy(e)
        for s in self._streams:
            self.rt.cudaStreamDestroy(s)
        for p in self._ptrs:
            self.rt.cudaFree(p)
        self._events, self._streams, self._ptrs = [], [], []


class _TorchCuda:
    """torch.cuda, for hosts with PyTorch's CUDA build and no cuda-python."""

    name = "torch.cuda"

    def __init__(self, torch: Any):
        self.torch = torch
        self._buffers: list[Any] = []
        self._streams: dict[int, Any] = {}

    def device_count(self) -> int:
        return int(self.torch.cuda.device_count()) if self.torch.cuda.is_available() else 0

    def describe(self) -> str:
        major, minor = self.torch.cuda.get_device_capability(0)
        name = self.torch.cuda.get_device_name(0)
        return f"{name} (sm_{major}{minor}), CUDA runtime {self.torch.version.cuda}, via {self.name}"

    def alloc(self, nbytes: int) -> int:
        buf = self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, device="cuda")
        self._buffers.append(buf)
        return int(buf.data_ptr())

    def upload(self, ptr: int, host: np.ndarray) -> None:
        buf = next(b for b in self._buffers if int(b.data_ptr()) == ptr)
        raw = np.ascontiguousarray(host).view(np.uint8).ravel()
        buf[: raw.size].copy_(self.torch.from_numpy(raw))

    def stream(self) -> int:
        s = self.torch.cuda.Stream()
        handle = int(s.cuda_stream)
        self._streams[handle] = s
        return handle

    def elapsed_ms(self, stream: int, launch: Callable[[], None]) -> float:
        s = self._streams[stream]
        start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record(s)
        launch()
        end.record(s)
        end.synchronize()
        return float(start.elapsed_time(end))

    def synchronize(self, stream: int) -> None:
        self._streams[stream].synchronize()

    def release(self) -> None:
        self._buffers, self._streams = [], {}


def _cuda_python() -> Any | None:
    """cuda-python's runtime module, new layout first, or None."""
    for module in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    return None


def cuda() -> tuple[Cuda | None, str]:
    """The CUDA binding to time with and its device description, or None and why not."""
    rt = _cuda_python()
    if rt is not None:
        binding: Cuda = _CudaPython(rt)
    elif importlib.util.find_spec("torch") is not None:
        binding = _TorchCuda(importlib.import_module("torch"))
    else:
        gpus = environment.gpus()
        listed = f" ({'; '.join(gpus)} listed by nvidia-smi)" if gpus else ""
        return None, (
            f"no CUDA runtime binding to drive the GPU{listed}: install cuda-python "
            "(pip install cuda-python), which TensorRT's Python samples use"
        )
    if binding.device_count() == 0:
        return None, f"{NO_DEVICE} ({binding.name} sees none)"
    return binding, binding.describe()


def availability() -> Availability:
    """What this machine lacks to build and time TensorRT engines (nothing: ``ok``).

    Cheap where TensorRT is absent: its module is looked up, not imported, and the GPU is asked of
    nvidia-smi only."""
    reasons = []
    version = None
    if importlib.util.find_spec("tensorrt") is None:
        reasons.append(f"{NOT_IMPORTABLE} (no module named 'tensorrt'; pip install tensorrt on a GPU host)")
    else:
        try:
            trt = importlib.import_module("tensorrt")
            version = str(getattr(trt, "__version__", "unknown"))
        except Exception as exc:  # a wheel without its CUDA libraries raises OSError or ImportError
            reasons.append(f"{NOT_IMPORTABLE} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    if reasons:  # no TensorRT: say whether a GPU is there too, without importing any CUDA library
        gpus = environment.gpus()
        if not gpus:
            reasons.append(f"{NO_DEVICE} (nvidia-smi lists no GPU)")
        return Availability(tuple(reasons), version, "; ".join(gpus))
    binding, device = cuda()
    if binding is None:
        return Availability((device,), version)
    binding.release()
    return Availability((), version, device)


@dataclass
class Built:
    """A serialized engine and what its inspector says about it."""

    plan: bytes
    inspector_json: str  # get_engine_information(LayerInformationFormat.JSON)
    build_seconds: float
    tensorrt: str
    warnings: list[str] = field(default_factory=list)


def _trt() -> Any:
    try:
        return importlib.import_module("tensorrt")
    except Exception as exc:
        fail(BackendUnavailable, f"{NOT_IMPORTABLE}: {exc}")


def _logger(trt: Any) -> tuple[Any, list[str]]:
    """A TensorRT logger that keeps warnings and errors (for the message of a failed build), and them."""
    kept: list[str] = []
    worst = int(trt.ILogger.Severity.WARNING)

    class KeepWarnings(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= worst:
                kept.append(msg)

    return KeepWarnings(), kept


def build(model: bytes | Path, shapes: Mapping[str, tuple[int, ...]], workspace_mb: int | None = None) -> Built:
    """A strongly typed engine of the ONNX ``model`` for inputs of exactly ``shapes`` (name -> shape),
    built with detailed profiling verbosity so its inspector names every layer's types and ONNX nodes.

    Raises ModelError when TensorRT cannot parse or build the model (its messages in the text)."""
    trt = _trt()
    logger, messages = _logger(trt)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        fail(
            BackendUnavailable,
            f"TensorRT {trt.__version__} has no strongly typed networks; build engines with TensorRT 10 or 11.",
        )
    network = builder.create_network(1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(model)) if isinstance(model, Path) else parser.parse(model)
    if not ok:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        fail(ModelError, "TensorRT cannot parse the ONNX model: " + " | ".join(errors[:5] or messages[-5:]))
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    profile = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in shapes:
            fail(ModelError, f"no shape for engine input {tensor.name!r} (have {sorted(shapes)})")
        shape = tuple(int(d) for d in shapes[tensor.name])
        if any(d < 0 for d in tensor.shape):
            dynamic = True
            profile.set_shape(tensor.name, shape, shape, shape)
    if dynamic:
        config.add_optimization_profile(profile)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        fail(ModelError, "TensorRT could not build the engine: " + " | ".join(messages[-5:]))
    plan_bytes = bytes(plan)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan_bytes)
    inspector = engine.create_engine_inspector()
    if dynamic:
        # without a context whose input shapes are set, an engine with dynamic inputs is inspected with
        # -1 for every shape-dependent dim and no formats, hence no types (IEngineInspector's docs)
        context = engine.create_execution_context()
        for name, shape in shapes.items():
            context.set_input_shape(name, tuple(int(d) for d in shape))
        inspector.execution_context = context
    info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    return Built(plan_bytes, str(info), seconds, str(trt.__version__), messages)


def time_engine(
    plan: bytes, feeds: Mapping[str, np.ndarray], iterations: int, warmup: int, repeats: int
) -> list[np.ndarray]:
    """GPU time in milliseconds of each inference, one array per repeat, ``warmup`` untimed inferences
    first. Inputs are copied to the device once: each figure is one enqueue of the engine between two
    CUDA events on its stream (what trtexec reports as GPU Compute Time), no host copies."""
    trt = _trt()
    binding, device = cuda()
    if binding is None:
        fail(BackendUnavailable, device)
    logger, messages = _logger(trt)
    try:
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        for name in inputs:
            context.set_input_shape(name, tuple(feeds[name].shape))
        for name in names:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                fail(ModelError, f"engine tensor {name!r} has a data-dependent shape {shape}; it cannot be timed here")
            ptr = binding.alloc(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
            if name in inputs:
                binding.upload(ptr, np.asarray(feeds[name]).astype(dtype, copy=False))
            context.set_tensor_address(name, ptr)
        stream = binding.stream()

        def launch() -> None:
            if not context.execute_async_v3(stream):
                fail(ModelError, "TensorRT failed to enqueue the engine: " + " | ".join(messages[-3:]))

        for _ in range(warmup):
            launch()
        binding.synchronize(stream)
        return [np.array([binding.elapsed_ms(stream, launch) for _ in range(iterations)]) for _ in range(repeats)]
    finally:
        binding.release()

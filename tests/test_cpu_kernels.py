"""Portable INT8 on ORT's CPU kernels: the saturation bound of each weight scheme against an
emulation of the kernels' arithmetic, the scheme a fleet gets, the quantized weights honouring it,
and the kernel-fidelity check on models whose kernel result departs (or cannot) on this CPU."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pipeline.analysis import kernel_fidelity
from pipeline.execution import cpu_kernels
from pipeline.execution.cpu_kernels import ISAS, SCHEMES
from pipeline.graph.model import toposort
from pipeline.transforms import dynamic
from pipeline.transforms.quantization import QuantizeOptions, quantize
from tests.models import build


def vpmaddubsw(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AVX2's u8 x s8 multiply-add, emulated: products of neighbours summed into int16, saturating."""
    pairs = a.astype(np.int64).reshape(-1, 2) * w.astype(np.int64).reshape(-1, 2)
    return np.clip(pairs.sum(axis=1), -(2**15), 2**15 - 1)


def test_worst_case_sums_are_the_known_bounds() -> None:
    assert cpu_kernels.worst_sum(SCHEMES["int8"], ISAS["avx2"]) == (2 * 255 * 127, 32767)
    assert cpu_kernels.saturates(SCHEMES["int8"], ISAS["avx2"])
    assert cpu_kernels.saturates(SCHEMES["int8"], ISAS["avx512bw"])
    assert cpu_kernels.worst_sum(SCHEMES["int7"], ISAS["avx2"]) == (32640, 32767)
    assert not cpu_kernels.saturates(SCHEMES["int7"], ISAS["avx2"])
    assert cpu_kernels.saturates(SCHEMES["uint8"], ISAS["avx2"])  # not proven safe: layers departed on AVX2
    for isa in ("avx512_vnni", "avx_vnni", "amx_int8", "arm64", "arm64_dotprod"):
        assert not cpu_kernels.saturates(SCHEMES["int8"], ISAS[isa])


@pytest.mark.parametrize("scheme", ["int8", "int7"])
def test_bound_agrees_with_the_emulated_kernel(scheme: str) -> None:
    """Every extreme pair of activations and weights of the scheme, through the emulated kernel."""
    lo, hi = SCHEMES[scheme].weight_range
    combos = np.array(list(itertools.product([0, 255], [0, 255], [lo, hi], [lo, hi])))
    a, w = combos[:, :2], combos[:, 2:]
    exact = (a.astype(np.int64) * w).sum(axis=1)
    emulated = vpmaddubsw(a.reshape(-1), w.reshape(-1))
    assert np.array_equal(emulated, exact) is not cpu_kernels.saturates(SCHEMES[scheme], ISAS["avx2"])


def test_the_fleet_decides_the_scheme() -> None:
    assert cpu_kernels.choose(None).name == cpu_kernels.choose(["all"]).name == cpu_kernels.PORTABLE == "int7"
    assert cpu_kernels.choose(["avx512_vnni", "avx2"]).name == "int7"  # one CPU without VNNI is enough
    assert cpu_kernels.choose(["avx512_vnni", "amx_int8", "arm64_dotprod"]).name == "int8"
    for name in ("int7", "int7_all"):
        assert not any(cpu_kernels.saturates(SCHEMES[name], isa) for isa in ISAS.values())


def test_isa_from_cpu_flags() -> None:
    assert cpu_kernels.machine_isa({"avx2", "fma"}, "x86_64") == "avx2"
    assert cpu_kernels.machine_isa({"avx2", "avx512bw"}, "x86_64") == "avx512bw"
    assert cpu_kernels.machine_isa({"avx2", "avx512bw", "avx512_vnni"}, "x86_64") == "avx512_vnni"
    assert cpu_kernels.machine_isa({"avx2", "avx_vnni"}, "x86_64") == "avx_vnni"
    assert cpu_kernels.machine_isa({"asimd", "asimddp"}, "aarch64") == "arm64_dotprod"
    assert cpu_kernels.machine_isa({"asimd"}, "aarch64") == "arm64"
    assert cpu_kernels.machine_isa({"sse4_2"}, "x86_64") is None
    cap = cpu_kernels.this_machine()
    assert cap["isa"] in (*ISAS, "unknown") and cap["onnxruntime"]
    assert cpu_kernels.describe(cap).startswith(cap["cpu"])


def _saturating(weights: str, activations: str = "asymmetric") -> onnx.ModelProto:
    """The registry's saturating Conv as int8pipe quantizes it for ORT with the given weight scheme."""
    amax = {"x": 1.0, "y": 16.0}
    observed = {"x": (0.0, 1.0), "y": (0.0, 16.0)}
    opts = QuantizeOptions(target="onnxruntime", activations=activations, weights=weights)
    model = quantize(build("saturating_conv"), amax, opts, observed)
    toposort(model)  # ORT's quantizer appends nodes out of order; the quantize step sorts them the same way
    return model


def _weights(model: onnx.ModelProto) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w_quantized"))


def test_quantized_weights_stay_in_the_scheme_range() -> None:
    int8, int7, uint8 = (_saturating(s) for s in ("int8", "int7", "uint8"))
    for m in (int8, int7, uint8):
        onnx.checker.check_model(m, full_check=True)
    assert _weights(int8).dtype == np.int8 and np.abs(_weights(int8)).max() == 127
    assert _weights(int7).dtype == np.int8 and np.abs(_weights(int7).astype(int)).max() == 64
    assert _weights(uint8).dtype == np.uint8
    # activations keep all 256 levels in every scheme: only the weights give up range
    zps = [numpy_helper.to_array(i) for i in int7.graph.initializer if "zero_point" in i.name and i.dims == []]
    assert any(z.dtype == np.uint8 for z in zps)


def _feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.uniform(0.9, 1.0, size=(4, 16, 4, 4)).astype(np.float32)}]


@pytest.mark.parametrize("activations", ["asymmetric", "symmetric"])
def test_fidelity_finds_saturation_exactly_where_this_cpu_has_it(activations: str) -> None:
    """On AVX2 the int8 Conv saturates and departs; on a VNNI machine it cannot. The portable schemes
    compute the exact arithmetic on either. Symmetric int8 activations are no way out: ORT rewrites
    them to uint8 with zero point 128 before its u8 x s8 kernels."""
    saturates_here = cpu_kernels.this_machine()["u8s8_saturates"]
    rows = kernel_fidelity.compare(_saturating("int8", activations), None, _feeds())
    conv = next(r for r in rows if r["node"] == "conv")
    assert conv["departs"] is saturates_here
    if saturates_here:
        assert conv["share_off_by_more_than_1_lsb"] > 0.5  # every output sums pairs past 32767
        assert kernel_fidelity.first_departures(rows) == ["conv"]
    for scheme in ("int7", "int7_all"):
        rows = kernel_fidelity.compare(_saturating(scheme, activations), None, _feeds())
        assert rows and not any(r["departs"] for r in rows), scheme


def test_fidelity_names_the_layer_a_disagreeing_model_departs_at() -> None:
    """A dynamic model against an 'exact' twin altered on purpose in one layer (whatever the ISA):
    that layer is where the results part, and the layers before it agree."""
    int8 = dynamic.quantize_dynamic(build("tiny_attention"), True, (), (), scheme=SCHEMES["int7"])
    twin = kernel_fidelity.exact_twin(int8)
    onnx.checker.check_model(twin, full_check=True)
    ids = {"ids": np.random.default_rng(4).integers(0, 20, size=(8, 5))}
    assert not any(r["departs"] for r in kernel_fidelity.compare(int8, twin, [ids]))
    wv = next(n for n in twin.graph.node if n.op_type == "MatMul" and n.output[0].startswith("int8pipe_exact_"))
    order = [r["node"] for r in kernel_fidelity.compare(int8, twin, [ids])]
    wrong = onnx.ModelProto()
    wrong.CopyFrom(twin)
    # the exact twin's product of one projection scaled by 1.5: its result and all after it part
    target = next(n for n in wrong.graph.node if n.output == wv.output)
    target.output[0] = "int8pipe_scaled"
    scale = onnx.helper.make_tensor("int8pipe_one_and_a_half", onnx.TensorProto.DOUBLE, [], [1.5])
    wrong.graph.initializer.append(scale)
    wrong.graph.node.append(onnx.helper.make_node("Mul", ["int8pipe_scaled", scale.name], [wv.output[0]]))
    toposort(wrong)
    rows = kernel_fidelity.compare(int8, wrong, [ids])
    first = kernel_fidelity.first_departures(rows, 1)
    assert first == [order[0]]  # the twin's first MatMulInteger is the one altered
    assert rows[0]["relative_error"] == pytest.approx(1 / 3, rel=1e-3)  # |1 - 1.5| / 1.5


def test_int7_keeps_depthwise_weights_8_bit_and_exact_on_this_cpu() -> None:
    """ORT's depthwise int8 kernel does not sum pairs in int16: with every product at its maximum it
    computes the exact arithmetic (on AVX2 this is the real check; with VNNI it holds trivially),
    so int7 keeps depthwise weights at 8 bits and reduces only the others."""
    amax = {"x": 1.0, "a": 9.0, "y": 72.0}
    observed = {k: (0.0, v) for k, v in amax.items()}
    x = np.random.default_rng(1).uniform(0.95, 1.0, size=(2, 8, 6, 6)).astype(np.float32)
    saturates_here = cpu_kernels.this_machine()["u8s8_saturates"]
    for scheme in ("int8", "int7", "int7_all"):
        opts = QuantizeOptions(target="onnxruntime", activations="asymmetric", weights=scheme)
        model = quantize(build("saturating_depthwise"), amax, opts, observed)
        toposort(model)
        onnx.checker.check_model(model, full_check=True)
        levels = {i.name: int(np.abs(numpy_helper.to_array(i).astype(int)).max()) for i in model.graph.initializer
                  if i.name in ("dw_quantized", "pw_quantized")}  # fmt: skip
        assert levels == {"dw_quantized": 64 if scheme == "int7_all" else 127,
                          "pw_quantized": 127 if scheme == "int8" else 64}  # fmt: skip
        scales = {i.name: list(i.dims) for i in model.graph.initializer if i.name in ("dw_scale", "pw_scale")}
        assert scales == {"dw_scale": [8], "pw_scale": [8]}  # both stay per channel
        rows = {r["node"]: r["departs"] for r in kernel_fidelity.compare(model, None, [{"x": x}])}
        assert rows["depthwise"] is False  # 8-bit depthwise weights never saturate
        assert rows["pointwise"] is (scheme == "int8" and saturates_here)


def test_a_gate_failed_by_the_kernels_says_so() -> None:
    from steps.validate import kernels_note

    cap = {"isa": "avx2", "onnxruntime": "1.32.0"}
    fidelity = {"exact": 0.9917, "kernels": 0.8, "departing": ["/features/features.0/Conv", "/fc/Gemm"]}
    note = kernels_note("top1", fidelity, cap)
    assert "computes top1 0.9917 exactly" in note and "give 0.8000" in note
    assert "first at /features/features.0/Conv, /fc/Gemm" in note and "That is the CPU, not the model" in note
    assert "steps.quantize.cpu_fleet" in note

"""What ONNX Runtime's int8 CPU kernels compute on each instruction set, and the weight scheme that
computes the same on every CPU of a fleet.

A Q/DQ model is portable; the arithmetic of ORT's fused int8 kernels is not. ORT multiplies uint8
activations (int8 activations are moved to uint8 by adding 128 first) by int8 weights:

- x86 with AVX2 or AVX-512BW but without VNNI: ``vpmaddubsw`` multiplies pairs and sums each pair
  into int16 *with saturation*: 2 x 255 x 127 = 64770 does not fit in 32767, so a layer whose inputs
  and weights are both large loses the excess silently.
- x86 with VNNI (AVX512-VNNI, AVX-VNNI, AMX-INT8) and arm64: four products summed straight into int32.
  Nothing saturates; the kernels compute the exact integer arithmetic.

7-bit weights cannot saturate on any of them (ORT's ``reduce_range``: |w| <= 64, so a pair sums to
at most 2 x 255 x 64 = 32640). uint8 weights (ORT's u8 x u8 kernels) were measured too and are not
chosen: up to 7x slower on AVX2, and some EfficientNet-Lite0 layers still departed from the exact
arithmetic on AVX2, so they are counted as saturating there (``benchmarks/cpu_portability.py``).
The x86 rows were measured (AVX2 here, VNNI on the machines the project measured before); the arm64
rows follow ORT's kernel designs and have not been run here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.tag_names import CPU_INT8_FLAGS_TAG, CPU_ISA_TAG, CPU_TAG, ONNXRUNTIME_TAG

INT16_MAX = 2**15 - 1
INT32_MAX = 2**31 - 1
ACTIVATION_MAX = 255  # what the u8 x s8 kernels multiply: uint8, or int8 shifted by 128


@dataclass(frozen=True)
class Isa:
    """One kind of CPU as ORT's int8 kernels see it."""

    name: str
    pair_sums_in_int16: bool  # u8 x s8 products summed two at a time into int16, saturating
    detail: str


ISAS: dict[str, Isa] = {
    i.name: i
    for i in (
        Isa("avx2", True, "AVX2 without VNNI: vpmaddubsw sums u8 x s8 pairs in int16 and saturates"),
        Isa("avx512bw", True, "AVX-512 without VNNI: the same vpmaddubsw, 512 bits wide, saturates"),
        Isa("avx_vnni", False, "AVX-VNNI: vpdpbusd sums four u8 x s8 products in int32"),
        Isa("avx512_vnni", False, "AVX512-VNNI: vpdpbusd sums four u8 x s8 products in int32"),
        Isa("amx_int8", False, "AMX-INT8: tile multiplies accumulate in int32"),
        Isa("arm64", False, "arm64 NEON: widening multiplies accumulate in int32"),
        Isa("arm64_dotprod", False, "arm64 dot product (sdot/udot): four products summed in int32"),
    )
}
ALL = "all"  # every ISA above: the fleet nobody has described
# x86 ISAs, best first, each named as its /proc/cpuinfo flag (a VNNI CPU also has avx2)
_X86_ORDER = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512bw", "avx2")


@dataclass(frozen=True)
class Scheme:
    """How weights are stored for ORT's int8 CPU kernels."""

    name: str
    weight_range: tuple[int, int]  # the integer levels a weight may take
    uint8_weights: bool  # ORT's u8 x u8 kernels instead of u8 x s8
    reduce_range: bool  # ORT's option for 7-bit weights
    detail: str
    # depthwise Convs keep 8-bit weights: ORT's depthwise int8 kernel widens its operands and sums in
    # int32, no pair sums (measured on AVX2 with worst-case inputs: tests/test_cpu_kernels.py)
    depthwise_8bit: bool = False


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("int8", (-127, 127), False, False, "8-bit symmetric int8 weights (saturates without VNNI)"),
        Scheme(
            "int7",
            (-64, 64),
            False,
            True,
            "7-bit int8 weights (reduce_range), 8-bit in depthwise Convs: cannot saturate",
            depthwise_8bit=True,
        ),
        Scheme("int7_all", (-64, 64), False, True, "7-bit int8 weights (reduce_range) everywhere: cannot saturate"),
        Scheme("uint8", (0, 255), True, False, "8-bit asymmetric uint8 weights (u8 x u8 kernels), measured only"),
    )
}
# The scheme a fleet with a CPU without VNNI gets, by measurement (benchmarks/results/cpu_portability.md):
# int7 ran as fast as int8 where uint8 weights took ORT's slow u8 x u8 kernels (several times the
# latency on AVX2), and ORT has no int8-activation x uint8-weight kernel at all.
PORTABLE = "int7"


def worst_sum(scheme: Scheme, isa: Isa) -> tuple[int, int]:
    """(the largest |partial sum| the kernel forms, the largest its accumulator holds)."""
    w = max(abs(v) for v in scheme.weight_range)
    if scheme.uint8_weights:  # not proven either way: layers departed on AVX2, so counted as an int8 grid
        w = 128
    if isa.pair_sums_in_int16:
        return 2 * ACTIVATION_MAX * w, INT16_MAX
    return 4 * ACTIVATION_MAX * w, INT32_MAX  # VNNI/dot product: four products into int32


def saturates(scheme: Scheme, isa: Isa) -> bool:
    total, limit = worst_sum(scheme, isa)
    return total > limit


def fleet(names: list[str] | None) -> list[Isa]:
    """The ISAs of a ``cpu_fleet`` list (None or ``all``: every known ISA)."""
    if not names or ALL in names:
        return list(ISAS.values())
    return [ISAS[n] for n in names]


def choose(names: list[str] | None) -> Scheme:
    """Full 8-bit int8 weights where no CPU of the fleet can saturate them, else ``PORTABLE``."""
    if not any(saturates(SCHEMES["int8"], i) for i in fleet(names)):
        return SCHEMES["int8"]
    return SCHEMES[PORTABLE]


def machine_isa(flags: set[str], machine: str) -> str | None:
    """This CPU's entry in ``ISAS`` from its /proc/cpuinfo flags (None: an x86 older than AVX2)."""
    if machine.lower() in ("aarch64", "arm64"):
        return "arm64_dotprod" if "asimddp" in flags else "arm64"
    return next((isa for isa in _X86_ORDER if isa in flags), None)


def this_machine() -> dict[str, Any]:
    """The int8 capability of the machine this runs on: its ISA, the flags it was read from, whether
    ORT's u8 x s8 kernels saturate here, and the ORT version."""
    import onnxruntime

    from pipeline.execution.environment import cpu

    here = cpu()
    flags = set(here["flags"])
    isa = machine_isa(flags, here["machine"])
    known = {"avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp"}
    return {
        "cpu": here["model"],
        "isa": isa or "unknown",
        "int8_flags": sorted(flags & known),
        # unknown x86 (pre-AVX2) kernels: counted as saturating, the cautious reading
        "u8s8_saturates": ISAS[isa].pair_sums_in_int16 if isa else True,
        "onnxruntime": onnxruntime.__version__,
    }


def describe(cap: dict[str, Any]) -> str:
    """One line for a tag: ``AMD EPYC; avx2 (u8 x s8 saturates in int16); onnxruntime 1.20.0``."""
    kernels = "u8 x s8 saturates in int16" if cap["u8s8_saturates"] else "int32 dot products, exact"
    return f"{cap['cpu']}; {cap['isa']} ({kernels}); onnxruntime {cap['onnxruntime']}"


def tags(cap: dict[str, Any]) -> dict[str, str]:
    """The run tags that say which int8 kernels a number was measured on."""
    return {
        CPU_TAG: describe(cap),
        CPU_ISA_TAG: cap["isa"],
        CPU_INT8_FLAGS_TAG: ",".join(cap["int8_flags"]) or "none",
        ONNXRUNTIME_TAG: cap["onnxruntime"],
    }


def deployed_numerics(scheme: Scheme, cap: dict[str, Any]) -> str:
    """``kernels`` when this machine's int8 kernels compute what the fleet's do, else ``exact``: a
    full 8-bit model (chosen only for a fleet without saturating CPUs) on a CPU that saturates is
    judged on the exact arithmetic, which is what every CPU of its fleet computes."""
    isa = ISAS.get(cap["isa"])
    here = (
        saturates(scheme, isa) if isa is not None else saturates(scheme, ISAS["avx2"])
    )  # unknown: the cautious reading
    return "exact" if here else "kernels"


def portability(scheme: Scheme, names: list[str] | None, cap: dict[str, Any] | None) -> str:
    """The registry version's answer to "does this model compute the same on every CPU I serve from?"."""
    listed = ", ".join(i.name for i in fleet(names))
    if scheme.name != "int8":
        total, limit = worst_sum(scheme, ISAS["avx2"])
        text = (
            f"{scheme.detail}; worst-case partial sum {total} <= {limit} on CPUs without VNNI, so ORT's int8 "
            f"kernels compute the exact arithmetic on every CPU of the fleet ({listed})."
        )
    else:
        text = (
            f"full 8-bit int8 weights for a fleet whose CPUs all sum in int32 ({listed}); on a CPU without "
            "VNNI (AVX2, AVX-512BW) ORT's kernels saturate: do not serve it there."
        )
    if cap is not None and not cap["u8s8_saturates"] and scheme.name == "int8":
        text += f" Validated only on int32 (VNNI-class) kernel numerics ({cap['isa']})."
    return text

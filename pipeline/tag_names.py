"""Every tag key int8pipe writes, in one place (documented in docs/runs-artifacts-metrics.md).

Runs, the experiment's pipeline runs and registry versions are filtered and compared by these names,
so they are contracts: add, don't rename.
"""

PREFIX = "int8pipe"

# step runs: what they are and how they were reused (pipeline/mlflow_io/tracking.py)
STEP_TAG = "int8pipe.step"
KEY_TAG = "int8pipe.cache_key"
OUTPUTS_TAG = "int8pipe.outputs"
REUSED_TAG = "int8pipe.reused"
REUSED_FROM_TAG = "int8pipe.reused_from"
THRESHOLDS_FROM_TAG = "int8pipe.thresholds_from"  # calibrate: thresholds recomputed from a reused run's histograms

# liveness of a running process (pipeline/mlflow_io/store.py) and how a run ended
HOST_TAG = "int8pipe.host"
PID_TAG = "int8pipe.pid"  # "<pid>:<process start time>": a reused pid is not the same process
# "<boot id>/<pid namespace>": where that pid means something (containers share hostnames, not PID namespaces)
PID_NAMESPACE_TAG = "int8pipe.pid_namespace"
HEARTBEAT_TAG = "int8pipe.heartbeat"
CLOSED_BY_TAG = "int8pipe.closed_by"
ERROR_TAG = "int8pipe.error"

# the pipeline run and the registry version: what the pipeline was
PIPELINE_TAG = "int8pipe.pipeline"
TARGET_TAG = "int8pipe.target"
CALIBRATION_METHOD_TAG = "int8pipe.calibration_method"
METHOD_TAG = "int8pipe.method"  # the pipeline run's older name for the calibration method, kept for a release
GATE_TAG = "int8pipe.gate"
SWEEP_TAG = "int8pipe.sweep"
REGISTERED_VERSION_TAG = "int8pipe.registered_version"  # models:/<name>/<version> the pipeline registered
BEST_RUN_TAG = "int8pipe.best_run"
BEST_TRIAL_TAG = "int8pipe.best_trial"

# the registry version (pipeline/mlflow_io/registry.py, steps/promote.py). A version carries the few
# tags a person filters on (GATE, METRIC, VALUE, TARGET, PRECISION, CALIBRATION_METHOD), the facts the
# promotion logic reads as one JSON tag (PROMOTION), and the alias decision; everything else is in
# its description (docs/runs-artifacts-metrics.md, The registry version)
METRIC_TAG = "int8pipe.metric"
VALUE_TAG = "int8pipe.metric_value"
PROMOTION_TAG = "int8pipe.promotion"  # JSON: int8_sha256, validation_digest, alias, policy
DECISION_TAG = "int8pipe.alias_decision"
WITHDRAWN_TAG = "int8pipe.withdrawn"  # set by a person: never given an alias by int8pipe again
INCOMPLETE_TAG = "int8pipe.incomplete"
# Versions registered before PROMOTION_TAG carry its facts under these, still read (registry.facts);
# the other tags of that layout are no longer written (their facts are in the description)
DATA_TAG = "int8pipe.validation_digest"
ALIAS_TAG = "int8pipe.alias"  # the alias the version competes for, "(none)" when the YAML asked for none
POLICY_TAG = "int8pipe.policy"  # better | always: how the alias is chosen while this is the newest version
INT8_SHA256_TAG = "int8pipe.int8_sha256"
EVIDENCE_TAG = "int8pipe.evidence"  # .<name>: a runs:/ URI
RUN_TAG = "int8pipe.run"  # .<step>: the step's run id
FP32_TAG = "int8pipe.fp32"  # _source, _version: the FP32 parent
FP32_SHA256_TAG = "int8pipe.fp32_sha256"
VALIDATED_ON_TAG = "int8pipe.validated_on"
CPU_PORTABILITY_TAG = "int8pipe.cpu_portability"
LATENCY_ON_TAG = "int8pipe.latency_measured_on"

# where numbers were measured and which CPUs an ONNX Runtime model computes the same on (cpu_kernels)
CPU_TAG = "int8pipe.cpu"
CPU_ISA_TAG = "int8pipe.cpu.isa"
CPU_INT8_FLAGS_TAG = "int8pipe.cpu.int8_flags"
ONNXRUNTIME_TAG = "int8pipe.onnxruntime"
INT8_NUMERICS_TAG = "int8pipe.int8_numerics"
WEIGHT_SCHEME_TAG = "int8pipe.weight_scheme"
CPU_FLEET_TAG = "int8pipe.cpu_fleet"
GRAPH_KIND_TAG = "int8pipe.graph_kind"  # quantize: attention | convolutional, which decides the auto defaults
AUTO_CHOICES_TAG = "int8pipe.auto_choices"  # quantize: what each auto key became for this graph
PRECISION_TAG = "int8pipe.precision"  # what the quantized layers compute in: int8 | fp8

# the engine step (steps/engine.py): whether TensorRT engines were built here, and if not, why not
ENGINE_TAG = "int8pipe.engine"  # built | skipped
ENGINE_SKIP_REASON_TAG = "int8pipe.engine.skip_reason"  # e.g. "tensorrt not importable (...); no CUDA device (...)"
ENGINE_DEVICE_TAG = "int8pipe.engine.device"  # the GPU, its compute capability, driver and CUDA runtime
ENGINE_TENSORRT_TAG = "int8pipe.engine.tensorrt"  # the TensorRT version that built and timed the engines

"""The calibration table ONNX Runtime's TensorRT EP reads (``trt_int8_calibration_table_name``).

A FlatBuffers ``TrtTable`` of (tensor name, dynamic range as a decimal string) pairs, the schema
that ships with onnxruntime (``onnxruntime.quantization.CalTableFlatBuffers``).
"""

from __future__ import annotations

from pathlib import Path


def write(amax: dict[str, float], path: Path) -> None:
    import flatbuffers
    from onnxruntime.quantization.CalTableFlatBuffers import KeyValue, TrtTable

    builder = flatbuffers.Builder(1024)
    entries = []
    for name in sorted(amax):
        key = builder.CreateString(name)
        value = builder.CreateString(repr(float(amax[name])))
        KeyValue.KeyValueStart(builder)
        KeyValue.KeyValueAddKey(builder, key)
        KeyValue.KeyValueAddValue(builder, value)
        entries.append(KeyValue.KeyValueEnd(builder))
    TrtTable.TrtTableStartDictVector(builder, len(entries))
    for entry in reversed(entries):  # vectors are built back to front
        builder.PrependUOffsetTRelative(entry)
    vec = builder.EndVector()
    TrtTable.TrtTableStart(builder)
    TrtTable.TrtTableAddDict(builder, vec)
    builder.Finish(TrtTable.TrtTableEnd(builder))
    path.write_bytes(builder.Output())


def read(path: Path) -> dict[str, float]:
    from onnxruntime.quantization.CalTableFlatBuffers import TrtTable

    table = TrtTable.TrtTable.GetRootAsTrtTable(path.read_bytes(), 0)
    out = {}
    for i in range(table.DictLength()):
        kv = table.Dict(i)
        out[kv.Key().decode()] = float(kv.Value().decode())
    return out

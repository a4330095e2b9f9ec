"""The decode stage inside a GPU predict actor (``--decode gpu``): inputs in, a device tensor out.

What :func:`~cxr_ray.screen.stages.decode_batch` does on CPUs, with
:class:`~cxr_ray.io.gpu.decode.GpuDecoder`: the same guards and error codes, one row of
metadata per input, and the preprocessed images as one (N, 1, S, S) tensor on the GPU that the
model takes as it is (:meth:`~cxr_ray.engines.base.Backend.predict_tensor`). Inputs decoded on
the CPU (no GPU codec for them) are preprocessed on the CPU path's arrays and copied in, their
rows saying why in ``warnings``.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from cxr_ray.errors import DecodeError
from cxr_ray.io.gpu.decode import DeviceImage, GpuDecoder
from cxr_ray.io.inputs import display_name
from cxr_ray.preprocess import PreprocessConfig, preprocess_tensor
from cxr_ray.screen.schema import MAX_ERROR_CHARS, META_COLUMNS, META_FIELDS, status_for


def _clip(message: str) -> str:
    return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 3] + "..."


def decode_on_device(table: pa.Table, decoder: GpuDecoder, preprocessing: dict) -> tuple[pa.Table, torch.Tensor]:
    """``path`` column -> (metadata table of :data:`META_FIELDS`, (N, 1, S, S) float32 tensor on the
    decoder's device; zeros for rows that did not decode)."""
    config = PreprocessConfig.from_dict(preprocessing)
    size = config.image_size
    paths = table.column("path").to_pylist()
    names = [display_name(path) for path in paths]
    results = decoder.decode(paths, names=names)
    pixels = torch.zeros((len(paths), 1, size, size), dtype=torch.float32, device=decoder.device)
    columns: dict[str, list] = {name: [] for name in META_COLUMNS}
    for i, (path, name, result) in enumerate(zip(paths, names, results, strict=True)):
        row = dict.fromkeys(META_COLUMNS)
        row.update(path=path, warnings=[])
        try:
            if isinstance(result, DecodeError):
                raise result
            image = result.pixels if isinstance(result, DeviceImage) else torch.from_numpy(result.pixels)
            try:
                pixels[i] = preprocess_tensor(image.to(decoder.device), config)
            except Exception as exc:  # noqa: BLE001 - a decoder output preprocess cannot take
                raise DecodeError("corrupt", f"{name}: cannot be preprocessed ({type(exc).__name__})") from None
            row.update({k: v for k, v in result.meta.to_dict().items() if k in META_COLUMNS})
        except DecodeError as exc:
            row["error_code"], row["error"] = exc.code, _clip(exc.message)
        row["status"] = status_for(row["error_code"])
        for key in META_COLUMNS:
            columns[key].append(row[key])
    schema = pa.schema(META_FIELDS)
    return pa.Table.from_arrays([pa.array(columns[f.name], type=f.type) for f in schema], schema=schema), pixels

"""DICOM decoding: every check the header allows, before any pixel is decoded.

Modules: ``tags`` (constants, recognition), ``header`` (parse and check), ``pixels``
(extent, frame decoding), ``values`` (LUT / window / rescale to [0, 1]), ``decoder`` (the entry point).

Order of work (cheap and refusing first):

1. Parse the header with pydicom (``stop_before_pixels``): pixel data are
   never read into a Python object, so a file that is refused costs one
   header parse.
2. Refuse what is not a frontal projection radiograph: SOP class allow-list,
   modality, view position, frame count, pixel count (rows x cols x samples x
   frames decoded), transfer syntax (a decoder plugin must be installed),
   photometric interpretation.
3. Locate the Pixel Data element in the original bytes and check its extent:
   native data must be as long as the header says, encapsulated data must
   have every item and the sequence delimiter present. Either failing is
   ``truncated``; no decoder sees a short buffer.
4. Decode one frame with pydicom's decoder (a zero-copy view for native
   syntaxes), or, when the caller only needs ``target_size`` pixels, hand
   the frame to Pillow: 8-bit grey JPEG Baseline at reduced DCT scale, and
   unsigned grey JPEG 2000 with only the wavelet levels needed (about 15x
   faster than a full decode for a 1,280-pixel image at 224).
5. Modality LUT / rescale, VOI LUT / window (min-max when neither is present),
   MONOCHROME1 inversion, all in float32 in place.

Policy decisions worth knowing:

* Colour images (RGB, YBR_FULL, YBR_FULL_422, YBR_ICT, YBR_RCT) are converted
  to luminance (ITU-R 601 weights, as Pillow's ``convert("L")``) with a
  warning; PALETTE COLOR and the retired YBR_PARTIAL_* are refused with
  ``unsupported_photometric``.
* Deflated transfer syntax is refused (``unsupported_transfer_syntax``):
  pydicom inflates the whole dataset, pixels included, before the header can
  be checked, which defeats the size guard. No X-ray modality writes it.
* Float Pixel Data is reported as ``no_pixel_data`` (no radiograph uses it).
* Presentation LUT Shape is ignored: for CR/DX it only restates what
  MONOCHROME1/2 already says.
"""

from cxr_ray.io.dicom.decoder import decode_dicom
from cxr_ray.io.dicom.tags import ALLOWED_SOP_CLASSES, has_dicom_preamble, looks_like_raw_dicom

__all__ = ["ALLOWED_SOP_CLASSES", "decode_dicom", "has_dicom_preamble", "looks_like_raw_dicom"]

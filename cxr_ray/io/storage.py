"""Where inputs and outputs live: local paths, ``s3://`` URIs, globs and manifests.

Every surface (train, screen, serve, synth) addresses files through this module,
so a command that works on a local folder works unchanged on a bucket.

Addressing
    * local paths (relative or absolute, or ``file://``) are returned absolute;
    * ``s3://bucket/key`` goes through s3fs. Credentials come from the standard
      AWS chain (``AWS_ACCESS_KEY_ID`` ..., profiles, instance roles). The
      endpoint is, in order: the explicit ``s3_endpoint`` argument (the CLI's
      ``--s3-endpoint``), ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, AWS.
      Other fsspec protocols (``gs://``, ``az://``, ...) work where their fsspec
      package is installed, without the streaming guarantees below.
    * ``dicomweb://host[:port]/path?query`` (and ``dicomweb+https://``) is a
      PACS: listed by QIDO-RS, read by WADO-RS (:mod:`cxr_ray.dicomnet.web`),
      with the credentials passed as ``dicomweb_auth``.

Expansion (:func:`expand_inputs`)
    * a directory (or an S3 prefix) yields every file below it, recursively;
    * a glob (``*``, ``?``, ``[..]``, ``**`` as a whole path component) yields
      the files it matches, and every file below the directories it matches;
    * a ``.csv`` / ``.parquet`` name is a manifest: its ``path`` column lists
      the inputs; relative entries resolve against the manifest's directory.
      Manifest entries are taken as given: not checked for existence (a
      missing one fails later, per file, when it is read) and not filtered;
    * anything else is one file, yielded as given.

    Hidden names (a path component starting with ``.``), ``_SUCCESS`` markers
    and S3 "directory" placeholder keys are skipped in listings. By default
    every other file is yielded: decode decides what is an image (DICOM files
    often have no extension). ``extensions`` filters listings, case-insensitive;
    ``""`` in the set keeps files without an extension.

What is streamed and what is held in memory
    * S3 listings are streamed one ``ListObjectsV2`` page (<= 1000 keys) at a
      time through s3fs's paginated ``_iterdir`` (``fs.find`` would build the
      whole key list first). Keys come in S3's lexicographic order; each page
      is sorted again before it is yielded.
    * Local listings are an ``os.scandir`` recursion run as a generator; one
      directory's entries are held (and sorted) at a time.
    * Globs are streamed the same way: the longest wildcard-free prefix is
      listed and each key is matched against the pattern, so a glob is no
      more expensive than listing its prefix.
    * Manifests are read in record batches with pyarrow (CSV streaming reader,
      Parquet row groups), one batch in memory at a time.
    * Inputs are not de-duplicated across specs (that would hold every path).

Missing inputs
    A spec that names nothing (missing file or directory, an S3 prefix with no
    keys, a glob that matches nothing) raises :class:`InputNotFoundError`, which
    is both a :class:`~cxr_ray.errors.UsageError` (the CLI exits 2 with a JSON
    message) and a :class:`FileNotFoundError`. Expansion is lazy: the error is
    raised when iteration reaches that spec. :func:`read_bytes` on a missing
    file raises a plain :class:`FileNotFoundError` (screening reports it per
    file as ``read_failed``).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import posixpath
import re
import shutil
import stat as statmod
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.asyn import sync
from fsspec.utils import glob_translate

from cxr_ray.dicomnet.web import DicomwebAuth, is_dicomweb, list_instances, retrieve_instance
from cxr_ray.errors import DecodeError, UsageError

MANIFEST_SUFFIXES = (".csv", ".parquet")
SKIPPED_NAMES = frozenset({"_SUCCESS"})
_GLOB_CHARS = re.compile(r"[*?\[]")
_LIST_PAGE = 1000  # S3's page size; local listings are per directory


class InputNotFoundError(UsageError, FileNotFoundError):
    """An input spec names nothing that exists (also a ``FileNotFoundError``)."""

    def __str__(self) -> str:  # OSError's formatting would show "(None)" noise
        return str(self.args[0]) if self.args else "input not found"


# --------------------------------------------------------------------------- addressing


def is_remote(uri: str) -> bool:
    """True for ``scheme://`` URIs other than ``file://`` (s3://, gs://, ...)."""
    scheme = _scheme(uri)
    return scheme not in ("", "file", "local")


def _scheme(uri: str) -> str:
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", str(uri))
    return match.group(1).lower() if match else ""


def resolve_s3_endpoint(s3_endpoint: str | None = None) -> str | None:
    """The S3 endpoint to use: the argument, then the standard AWS variables."""
    return (
        s3_endpoint
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )


def get_filesystem(uri: str, s3_endpoint: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path on it without the scheme.

    Local paths come back absolute. fsspec caches filesystem instances, so
    calling this per file is cheap.
    """
    uri = os.fspath(uri)
    scheme = _scheme(uri)
    if scheme in ("", "file", "local"):
        path = uri.split("://", 1)[1] if scheme else uri
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))
    if scheme in ("s3", "s3a"):
        endpoint = resolve_s3_endpoint(s3_endpoint)
        try:
            fs = fsspec.filesystem("s3", endpoint_url=endpoint) if endpoint else fsspec.filesystem("s3")
        except ImportError as exc:  # pragma: no cover - s3fs is a core dependency
            raise UsageError(f"{uri}: s3:// needs the s3fs package (pip install s3fs)") from exc
        return fs, uri.split("://", 1)[1].rstrip("/")
    try:
        fs = fsspec.filesystem(scheme)
    except (ImportError, ValueError) as exc:
        raise UsageError(
            f"{uri}: no filesystem for scheme {scheme!r} ({exc}); use a local path or s3://"
        ) from exc
    return fs, fs._strip_protocol(uri)


def to_pyarrow_filesystem(fs: fsspec.AbstractFileSystem):
    """A ``pyarrow.fs.FileSystem`` over ``fs`` (for Parquet writers, Ray Data)."""

    if _is_local_fs(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI (always ``/`` for URIs)."""
    if is_remote(uri):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def _is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def _as_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if _is_local_fs(fs):
        return path
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return f"{protocol}://{path}"


# --------------------------------------------------------------------------- reading / writing


def read_bytes(uri: str, s3_endpoint: str | None = None, max_bytes: int | None = None,
               dicomweb_auth: DicomwebAuth | None = None) -> bytes:
    """The whole content of one file (or one DICOMweb instance).

    With ``max_bytes``, a larger file raises ``DecodeError("too_large")`` after
    reading at most ``max_bytes + 1`` bytes (the size is not trusted from a
    listing; a DICOMweb instance is checked once retrieved). A missing file
    raises ``FileNotFoundError``.
    """
    if is_dicomweb(uri):
        data = retrieve_instance(uri, dicomweb_auth)
        if max_bytes is not None and len(data) > max_bytes:
            raise DecodeError("too_large", f"{_display_name(uri)}: larger than the {max_bytes}-byte limit")
        return data
    fs, path = get_filesystem(uri, s3_endpoint)
    if _is_local_fs(fs):
        _check_regular_file(path)
    if max_bytes is None:
        return fs.cat_file(path)
    with fs.open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DecodeError("too_large", f"{_display_name(uri)}: larger than the {max_bytes}-byte limit")
    return data


@contextlib.contextmanager
def open_output(uri: str, mode: str = "wb", s3_endpoint: str | None = None, **kwargs: Any) -> Iterator[IO]:
    """Open ``uri`` for writing; the file appears only if the block succeeds.

    Local: parent directories are created, the data goes to a hidden temporary
    file next to the target and is renamed over it on success (readers never
    see half a file). S3: a multipart upload is committed on success and
    aborted on error. Text modes (``"w"``) are UTF-8 unless ``encoding`` is given.
    """
    if "r" in mode or "+" in mode:
        raise UsageError(f"open_output is for writing; got mode {mode!r} (valid: 'wb', 'w', 'xb', 'x')")
    binary = "b" in mode
    fs, path = get_filesystem(uri, s3_endpoint)
    if _is_local_fs(fs):
        if "x" in mode and os.path.exists(path):
            raise FileExistsError(path)
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
        if not binary:
            kwargs.setdefault("encoding", "utf-8")
        try:
            with open(tmp, mode.replace("x", "w"), **kwargs) as handle:
                yield handle
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return

    if "x" in mode and fs.exists(path):
        raise FileExistsError(uri)
    raw = fs.open(path, "wb")
    handle: IO = raw if binary else io.TextIOWrapper(raw, encoding=kwargs.pop("encoding", "utf-8"), **kwargs)  # type: ignore[no-redef]
    try:
        yield handle
    except BaseException:
        if not binary:
            with contextlib.suppress(Exception):
                handle.detach()  # type: ignore[attr-defined]
        discard = getattr(raw, "discard", None)
        with contextlib.suppress(Exception):
            if discard is not None:
                discard()
        raw.closed = True  # do not let close() commit what was buffered
        raise
    handle.close()


def _topmost_missing_folder(uri: str) -> Path | None:
    """The outermost folder of a local ``uri`` that does not exist yet (None if it exists or is not local)."""
    if "://" in str(uri):
        return None
    missing = Path(uri).absolute()
    if missing.exists():
        return None
    while not missing.parent.exists():
        missing = missing.parent
    return missing


def check_writable(uri: str, s3_endpoint: str | None = None, option: str = "--output") -> None:
    """Write and delete a small probe object under ``uri``; :class:`UsageError` naming ``option`` if that fails.

    Run by the driver before any work starts: an output that cannot be written
    (a read-only mount, a path under a file, a bucket without write access)
    should stop the command at once, not after the first batch is screened.
    """
    probe = join(uri, f"_write_check.{uuid.uuid4().hex[:12]}")
    created = _topmost_missing_folder(uri)
    try:
        with open_output(probe, "wb", s3_endpoint=s3_endpoint) as handle:
            handle.write(b"cxr-ray write check\n")
        fs, path = get_filesystem(probe, s3_endpoint)
        fs.rm(path)
        if created is not None:  # a refused run later leaves no trace: the folders the probe made go too
            shutil.rmtree(created, ignore_errors=True)
    except Exception as exc:  # noqa: BLE001 - whatever the storage says, it is this option's problem
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise UsageError(f"{option} {uri}: cannot write there ({reason}); choose another location or fix its "
                         "permissions") from None


# --------------------------------------------------------------------------- expansion


def expand_inputs(
    spec: str | os.PathLike | Sequence[str | os.PathLike],
    s3_endpoint: str | None = None,
    extensions: set[str] | frozenset[str] | None = None,
    dicomweb_auth: DicomwebAuth | None = None,
) -> Iterator[str]:
    """Yield input URIs (``s3://...``, ``dicomweb://...`` or absolute local paths), lazily.

    ``spec`` is one spec or a sequence of them: a file, a directory/prefix, a
    glob, a ``.csv``/``.parquet`` manifest with a ``path`` column, or a
    DICOMweb query (one URI per instance). See the module docstring for
    ordering, skipping, filtering and memory behaviour.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    wanted = _normalise_extensions(extensions)
    for one in specs:
        if is_dicomweb(os.fspath(one)):
            yield from _expand_dicomweb(os.fspath(one), dicomweb_auth)
        else:
            yield from _expand_one(os.fspath(one), s3_endpoint, wanted)


def _expand_dicomweb(spec: str, auth: DicomwebAuth | None) -> Iterator[str]:
    found = False
    for uri in list_instances(spec, auth):
        found = True
        yield uri
    if not found:
        raise InputNotFoundError(f"input not found: {spec} (the DICOMweb query matched no instances)")


def _normalise_extensions(extensions: set[str] | frozenset[str] | None) -> frozenset[str] | None:
    if extensions is None:
        return None
    out = set()
    for ext in extensions:
        ext = ext.strip().lower()
        out.add(ext if not ext or ext.startswith(".") else "." + ext)
    return frozenset(out)


def _extension_ok(name: str, wanted: frozenset[str] | None) -> bool:
    if wanted is None:
        return True
    return os.path.splitext(name)[1].lower() in wanted


def _is_skipped(relative: str) -> bool:
    parts = relative.split("/")
    return parts[-1] in SKIPPED_NAMES or any(part.startswith(".") for part in parts if part)


def _expand_one(spec: str, s3_endpoint: str | None, wanted: frozenset[str] | None) -> Iterator[str]:
    if not spec:
        raise UsageError("empty input spec; give a file, directory, glob, s3:// URI or manifest")
    fs, path = get_filesystem(spec, s3_endpoint)
    if _GLOB_CHARS.search(path):
        yield from _expand_glob(fs, path, spec, wanted)
        return
    if path.lower().endswith(MANIFEST_SUFFIXES):
        yield from _read_manifest(fs, path, spec, s3_endpoint)
        return
    if _is_local_fs(fs):
        if os.path.isfile(path):
            yield path
        elif os.path.isdir(path):
            for found in _walk_local(path):
                if _extension_ok(found, wanted):
                    yield found
        else:
            raise InputNotFoundError(f"input not found: {spec}")
        return
    yield from _expand_remote(fs, path, spec, wanted)


def _expand_remote(fs, path: str, spec: str, wanted: frozenset[str] | None) -> Iterator[str]:
    bucket_only = "/" not in path
    if not bucket_only:
        try:
            if fs.isfile(path):
                yield _as_uri(fs, path)
                return
        except (PermissionError, OSError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise InputNotFoundError(f"input not found: {spec}") from exc
            raise
    prefix = "" if bucket_only else path + "/"
    listed_any = False
    pages = _list_remote(fs, path.split("/", 1)[0], prefix.split("/", 1)[1] if prefix else "")
    try:
        for page in pages:
            for key in page:
                listed_any = True
                relative = key[len(prefix) if prefix else len(path) + 1 :]
                if not relative or key.endswith("/") or _is_skipped(relative):
                    continue
                if _extension_ok(key, wanted):
                    yield _as_uri(fs, key)
    except FileNotFoundError as exc:  # no such bucket
        raise InputNotFoundError(f"input not found: {spec} ({exc})") from exc
    if not listed_any:
        raise InputNotFoundError(f"input not found: {spec} (no object and no keys under that prefix)")


def _list_remote(fs, bucket: str, key_prefix: str) -> Iterator[list[str]]:
    """Pages of full ``bucket/key`` names under ``key_prefix``, sorted per page.

    s3fs: drives the paginated async ``_iterdir`` one page at a time on the
    filesystem's event loop, so memory holds one page, not the whole prefix.
    Other filesystems fall back to ``fs.find`` (materialised).
    """
    iterdir = getattr(fs, "_iterdir", None)
    if iterdir is None or not getattr(fs, "loop", None):
        names = fs.find(f"{bucket}/{key_prefix}" if key_prefix else bucket, withdirs=False)
        for start in range(0, len(names), _LIST_PAGE):
            yield sorted(names[start : start + _LIST_PAGE])
        return

    async def pages():
        page: list[str] = []
        # delimiter="" lists every key below the prefix in one flat stream.
        async for info in iterdir(bucket, delimiter="", prefix=key_prefix):
            if info.get("type") == "file":
                page.append(info["name"])
            if len(page) >= _LIST_PAGE:
                yield page
                page = []
        if page:
            yield page

    agen = pages()
    try:
        while True:
            try:
                page = sync(fs.loop, agen.__anext__)
            except StopAsyncIteration:
                return
            yield sorted(page)
    finally:
        with contextlib.suppress(Exception):
            sync(fs.loop, agen.aclose)


def _walk_local(directory: str, seen: set | None = None) -> Iterator[str]:
    """Files below ``directory``, depth first, each directory's entries sorted.

    Every entry that is not a listable directory is yielded, whether or not it
    can be read: a dangling symlink, a FIFO, a file or sub-directory we may not
    open. Reading it then fails with ``read_failed`` (:func:`read_bytes` refuses
    what is not a regular file without opening it), so each such entry is one
    output row, never silently dropped.
    """
    seen = set() if seen is None else seen
    try:
        stat = os.stat(directory)
        if (stat.st_dev, stat.st_ino) in seen:  # symlink loop
            return
        seen.add((stat.st_dev, stat.st_ino))
        with os.scandir(directory) as entries:
            ordered = sorted(entries, key=lambda entry: entry.name)
    except OSError:  # a sub-directory we may not list (the top one was checked by the caller)
        yield directory
        return
    for entry in ordered:
        if entry.name.startswith(".") or entry.name in SKIPPED_NAMES:
            continue
        try:
            is_dir = entry.is_dir()
        except OSError:  # is_dir() swallows most errors; what is left is still an entry
            is_dir = False
        if is_dir:
            yield from _walk_local(entry.path, seen)
        else:
            yield entry.path


def _check_regular_file(path: str) -> None:
    """Raise the ``OSError`` reading ``path`` would hit, before anything opens it.

    A FIFO would block the reader forever and a directory is no input; a
    dangling symlink raises ``FileNotFoundError`` here; an unlistable directory
    raises the ``PermissionError`` its listing hit.
    """
    mode = os.stat(path).st_mode
    if statmod.S_ISREG(mode):
        return
    if statmod.S_ISDIR(mode):
        os.listdir(path)  # raises the listing's own error when that is why it was yielded
        raise IsADirectoryError(errno.EISDIR, "a folder, not a file")
    raise OSError(errno.EINVAL, "not a regular file (a FIFO, socket or device)")


def _literal_prefix(pattern: str) -> str:
    """The directory part of ``pattern`` before its first wildcard."""
    found = _GLOB_CHARS.search(pattern)
    first = found.start() if found else len(pattern)
    return pattern[: pattern.rfind("/", 0, first) + 1]


def _expand_glob(fs, pattern: str, spec: str, wanted: frozenset[str] | None) -> Iterator[str]:
    local = _is_local_fs(fs)
    if local and os.sep != "/":  # pragma: no cover - Windows
        pattern = pattern.replace(os.sep, "/")
    try:
        regex = re.compile(glob_translate(pattern))
    except ValueError as exc:
        raise UsageError(f"bad glob {spec!r}: {exc}") from exc
    base = _literal_prefix(pattern)  # ends with "/"; "" when the wildcard is in the first component
    if not local and not base:
        raise UsageError(f"bad glob {spec!r}: wildcards in the bucket name are not supported")
    matched = False
    try:
        for full in _iter_files_under(fs, base):
            relative = full[len(base) :]
            if _is_skipped(relative):
                continue
            if _glob_matches(regex, base, relative) and _extension_ok(full, wanted):
                matched = True
                yield _as_uri(fs, full)
    except FileNotFoundError as exc:  # no such bucket
        raise InputNotFoundError(f"no files match {spec} ({exc})") from exc
    if not matched:
        raise InputNotFoundError(f"no files match {spec}")


def _glob_matches(regex: re.Pattern, base: str, relative: str) -> bool:
    """The file matches, or one of its parent directories does (then it is below a match)."""
    parts = relative.split("/")
    return any(regex.match(base + "/".join(parts[:depth])) for depth in range(len(parts), 0, -1))


def _iter_files_under(fs, base: str) -> Iterator[str]:
    if _is_local_fs(fs):
        directory = base.rstrip("/") or "/"
        if os.path.isdir(directory):
            yield from _walk_local(directory)
        return
    bucket, _, key_prefix = base.partition("/")
    for page in _list_remote(fs, bucket, key_prefix):
        yield from (name for name in page if not name.endswith("/"))


# --------------------------------------------------------------------------- manifests


def _read_manifest(fs, path: str, spec: str, s3_endpoint: str | None) -> Iterator[str]:
    """``path`` column entries, streamed in record batches, relative ones resolved."""

    local = _is_local_fs(fs)
    try:
        handle = fs.open(path, "rb")
    except FileNotFoundError as exc:
        raise InputNotFoundError(f"manifest not found: {spec}") from exc
    base_dir = os.path.dirname(path) if local else posixpath.dirname(path)
    with handle:
        if path.lower().endswith(".parquet"):
            parquet = pq.ParquetFile(handle)
            columns = parquet.schema_arrow.names
            if "path" not in columns:
                raise UsageError(f"manifest {spec} has no 'path' column (columns: {columns})")
            batches = (batch.column(0) for batch in parquet.iter_batches(columns=["path"]))
        else:
            reader = pacsv.open_csv(
                handle, convert_options=pacsv.ConvertOptions(column_types={"path": pa.string()})
            )
            columns = reader.schema.names
            if "path" not in columns:
                raise UsageError(f"manifest {spec} has no 'path' column (columns: {columns})")
            index = columns.index("path")
            batches = (batch.column(index) for batch in reader)
        for column in batches:
            for entry in column.to_pylist():
                if entry is None or not str(entry).strip():
                    continue
                yield _resolve_entry(fs, str(entry).strip(), base_dir, local)


def _resolve_entry(fs, entry: str, base_dir: str, local: bool) -> str:
    if _scheme(entry):
        if is_remote(entry):
            return entry
        return os.path.abspath(entry.split("://", 1)[1])
    if os.path.isabs(entry) or entry.startswith("/"):
        return entry if not local else os.path.abspath(entry)
    if local:
        return os.path.normpath(os.path.join(base_dir, entry))
    return _as_uri(fs, posixpath.normpath(posixpath.join(base_dir, entry)))


def _display_name(uri: str) -> str:
    """The last path component: enough to find a file, no directory names (may hold PHI)."""
    return posixpath.basename(str(uri).rstrip("/")) or str(uri)

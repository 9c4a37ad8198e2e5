"""Every path a user names, local or in a bucket (`gs://bucket/dir`), through etils.epath.

`pathlib.Path("gs://b/run")` is the local path `gs:/b/run`: a run would write a local
`gs:` folder and fail at its first checkpoint. epath keeps the URL, and orbax (which
takes epath paths) writes its metadata through epath and its arrays through
tensorstore. Local paths behave as pathlib's.

Buckets go through gcsfs, not TensorFlow's GCS file system that epath prefers when
TensorFlow is installed: only gcsfs (and tensorstore) can be pointed at another
endpoint, which is how the cloud-storage code is tested against a local emulator.
tf.data still reads record files in buckets through TensorFlow itself.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob as glob_lib
import io
import json
import os
import secrets
import shutil
import tempfile
from typing import IO, Any, Iterator

from etils import epath

from jaxseg import cli

# Read by epath when it first picks a backend, so it is set before any path is used.
os.environ["EPATH_USE_TF"] = "false"

Path = epath.Path
EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"
_GLOB_CHARACTERS = frozenset("*?[")


def path(name: str | os.PathLike) -> epath.Path:
    """A local path or a `gs://` URL, kept as the user wrote it."""
    return epath.Path(name)


def absolute(name: str | os.PathLike) -> epath.Path:
    """Absolute for a local path (orbax requires one); a URL is absolute already, and
    `epath.Path.absolute` would prefix it with the working directory."""
    result = path(name)
    return result if result.is_absolute() else result.absolute()


def is_remote(name: str | os.PathLike) -> bool:
    return "://" in os.fspath(name)


def glob(pattern: str) -> list[epath.Path]:
    """Sorted matches of a shell pattern; in a bucket the wildcards may sit in any
    component after the bucket, as in a local pattern."""
    if not is_remote(pattern):
        return sorted(path(match) for match in glob_lib.glob(pattern))
    parts = pattern.split("/")   # scheme:, "", bucket, ...
    wild = [index for index, part in enumerate(parts) if _GLOB_CHARACTERS & set(part)]
    if not wild:
        return [path(pattern)] if path(pattern).exists() else []
    if wild[0] < 3:
        raise cli.InputError(f"{pattern}: wildcards are taken after the bucket name, not in it")
    root = path("/".join(parts[:wild[0]]))
    return sorted(root.glob("/".join(parts[wild[0]:])))


def make_parent(name: str | os.PathLike) -> None:
    """Creates the local folder a file goes in; a bucket has no folders to make."""
    if not is_remote(name):
        path(name).parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def open_text(name: str | os.PathLike) -> Iterator[IO[str]]:
    """UTF-8 text with line endings as stored, which the csv module needs (epath's
    `open` takes no `newline`)."""
    with path(name).open("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8",
                                                        newline="") as text:
        yield text


def publish(finished: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Puts a finished local file at `destination`: a rename on a local disk (atomic when
    both lie on one file system), else one upload, as a bucket object appears whole.
    An uploaded file stays where it was."""
    destination = path(destination)
    if not is_remote(destination):
        os.replace(finished, destination)
        return
    with open(finished, "rb") as source, destination.open("wb") as target:
        shutil.copyfileobj(source, target)


@dataclasses.dataclass
class StagedFile:
    """A local file being written (`path`) and where it goes when finished. The writer
    may change `destination` when the name depends on what was written (a count), or
    set it to None when there turned out to be nothing to publish."""
    path: str
    destination: epath.Path | None


@contextlib.contextmanager
def staged_file(destination: str | os.PathLike) -> Iterator[StagedFile]:
    """The one way jaxseg writes an output file: written under a temporary name and
    published whole when the block ends, removed if it fails, so a reader (or a resumed
    run) never finds half a file.

    The temporary name, `.NAME.<random>.tmp`, is unique to this writer, so two writers
    never share one; it lies next to the destination on a local disk, where the final
    move is a rename, and in the temp directory for a bucket.
    """
    destination = path(destination)
    remote = is_remote(destination)
    staging_dir = tempfile.gettempdir() if remote else destination.parent
    staged = StagedFile(os.path.join(staging_dir, f".{destination.name}."
                                                  f"{secrets.token_hex(8)}.tmp"), destination)
    # O_EXCL: never another writer's file; 0o666 less the umask, as `open` would create.
    os.close(os.open(staged.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield staged
        if staged.destination is not None and remote:
            publish(staged.path, staged.destination)
        elif staged.destination is not None:
            os.replace(staged.path, staged.destination)  # the same folder: a rename
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged.path)


@contextlib.contextmanager
def atomic_open(destination: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """A file that appears at `destination` whole when the block ends, and not at all if
    it fails (see `staged_file`)."""
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
    with staged_file(destination) as staged, open(staged.path, mode, **text) as file:
        yield file


def atomic_write(destination: str | os.PathLike, content: str | bytes) -> None:
    """Writes `content` whole or not at all (see `staged_file`)."""
    with atomic_open(destination, "wb" if isinstance(content, bytes) else "w") as file:
        file.write(content)


def read_json(name: str | os.PathLike) -> Any:
    """A JSON file jaxseg or the user wrote; one that does not parse is named."""
    try:
        return json.loads(path(name).read_text())
    except json.JSONDecodeError as error:
        raise cli.InputError(f"{name}: not valid JSON ({error})") from None


def setup_emulator_env() -> None:
    """Points every storage layer jaxseg drives at the emulator STORAGE_EMULATOR_HOST
    names, the variable gcsfs and Google's client libraries read; without it, nothing
    changes.

    Google's client (which orbax asks whether a bucket has a hierarchical namespace)
    needs the variable as a URL, gcsfs takes host:port too; tensorstore (orbax's array
    writer) reads a variable of its own. The emulator takes no credentials, so none are
    looked for, and it serves no storage-control API, which gcsfs would ask for each
    bucket's layout (and warn on every call that it cannot).
    """
    host = os.environ.get(EMULATOR_VARIABLE, "")
    if not host:
        return
    url = host if host.startswith(("http://", "https://")) else f"http://{host}"
    os.environ[EMULATOR_VARIABLE] = url
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
    os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "emulator"
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    import fsspec
    fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"

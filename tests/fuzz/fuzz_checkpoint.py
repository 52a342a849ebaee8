"""Coverage-guided fuzzing of fastbn's checkpoint reader with atheris, one format at a time.

    python tests/fuzz/fuzz_checkpoint.py FORMAT [libFuzzer options]

FORMAT is ``torch_zip``, ``legacy``, ``npz`` or ``safetensors``.  Inputs are whole files;
they are seeded from the real torch.save/numpy/safetensors files in tests/data, the crafted
ones in tests/fuzz/seeds and the findings in tests/fuzz/regressions.  The mutator knows each
format's structure, so most mutations reach past the container into what it holds:

* torch_zip, npz: mutate one member's bytes (the pickle, a storage, a .npy header) and pack
  the archive again, or the member table (drop, rename, duplicate, recompress a member), or
  the raw bytes (headers, sizes, offsets);
* legacy: mutate one of the file's pickles (magic, protocol, system information, the object,
  the storage keys) or its storage bytes, or the raw bytes;
* safetensors: mutate the JSON header (the length kept right, or not), or the raw bytes.

The contract checked on every input: read_checkpoint returns, or raises CheckpointError
(UnsafeCheckpointError included) -- a failure the readers did not foresee
(UnforeseenCheckpointError), any other exception, a crash, a hang (-timeout) or memory beyond
-rss_limit_mb is a finding, and libFuzzer writes the input as crash-*/timeout-*/oom-*.  Add
each finding, once fixed, to tests/fuzz/regressions/ (see its README) so the suite replays it.

Maintainers' campaign (see README, "Fuzzing"): a few million executions per format, e.g.

    python tests/fuzz/fuzz_checkpoint.py torch_zip -runs=2000000 -rss_limit_mb=2048 -timeout=10 CORPUS_DIR

CI runs each format for a fixed time (.ci/fuzz).
"""

import io
import os
import random
import sys
import tempfile
import warnings
import zipfile

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
FORMATS = ("torch_zip", "legacy", "npz", "safetensors")
SUFFIX = {"torch_zip": ".pt", "legacy": ".pt", "npz": ".npz", "safetensors": ".safetensors"}
MAX_SIZE = 1 << 16

with atheris.instrument_imports(include=["fastbn.checkpoint", "fastbn._readers", "zipfile",
                                         "pickletools"]):
    import fastbn.checkpoint
    from fastbn._readers.errors import CheckpointError, UnforeseenCheckpointError


def seeds(fmt):
    """The seed files of a format: (name, bytes)."""
    folders = [os.path.join(HERE, "..", "data"), os.path.join(HERE, "seeds"),
               os.path.join(HERE, "regressions")]
    for folder in folders:
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if not os.path.isfile(path) or name.endswith((".py", ".md", ".json", ".txt")):
                continue
            with open(path, "rb") as f:
                data = f.read()
            if format_of(data, name) == fmt:
                yield name, data


def format_of(data, name=""):
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                names = z.namelist()
        except Exception:
            return "torch_zip" if name.endswith(".pt") else "npz"
        return "npz" if names and all(n.endswith(".npy") for n in names) else "torch_zip"
    if data[:1] == b"\x80":
        return "legacy"
    if name.endswith(".safetensors") or data[8:9] == b"{":
        return "safetensors"
    return None


# -- the contract ------------------------------------------------------------------------------

class Target:
    """Writes each input to one file (read_checkpoint takes paths) and reads it."""

    def __init__(self, fmt):
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        handle, self.path = tempfile.mkstemp(suffix=SUFFIX[fmt], dir=folder)
        os.close(handle)

    def __call__(self, data):
        with open(self.path, "wb") as f:
            f.write(data)
        try:
            fastbn.checkpoint.read_checkpoint(self.path)
        except UnforeseenCheckpointError:
            raise  # a finding: the readers did not foresee it
        except CheckpointError:
            pass  # refused on purpose, with a message


# -- structure-aware mutation ------------------------------------------------------------------

def _mutate(data, max_size, rng):
    return atheris.Mutate(data, max(max_size, 1)) if data or rng.random() < 0.5 else bytes(
        rng.randrange(256) for _ in range(rng.randrange(1, 9)))


def _zip_members(data):
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(info, z.read(info)) for info in z.infolist()]


def _pack(members, rng):
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as z:
        warnings.simplefilter("ignore")  # (a member duplicated on purpose: "Duplicate name")
        for info, body in members:
            method = info.compress_type
            if rng.random() < 0.05:
                method = rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
            z.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), body,
                       compress_type=method)
    return out.getvalue()


def _mutate_zip(data, max_size, rng, prefer):
    members = _zip_members(data)
    if not members:
        raise ValueError("no members")
    choice = rng.random()
    if choice < 0.75:
        weights = [4 if info.filename.endswith(prefer) else 1 for info, _ in members]
        i = rng.choices(range(len(members)), weights)[0]
        info, body = members[i]
        if body[:6] == b"\x93NUMPY" and rng.random() < 0.7:  # the .npy header, mostly
            end = min(len(body), 128 + (body[8] | body[9] << 8))
            body = _mutate(body[:end], max_size // 2, rng) + body[end:]
        else:
            body = _mutate(body, max_size // 2, rng)
        members[i] = (info, body)
    elif choice < 0.85 and len(members) > 1:
        del members[rng.randrange(len(members))]
    elif choice < 0.95:
        i = rng.randrange(len(members))
        info, body = members[i]
        renamed = zipfile.ZipInfo(_mutate(info.filename.encode(), 200, rng).decode("utf-8", "replace"))
        renamed.compress_type = info.compress_type
        members[i] = (renamed, body)
    else:
        members.append(rng.choice(members))
    return _pack(members, rng)


def _pickle_spans(data):
    """Where each pickle of a legacy file starts and ends, then the storage bytes."""
    import pickletools
    spans, stream = [], io.BytesIO(data)
    for _ in range(5):
        start = stream.tell()
        for op, _arg, _pos in pickletools.genops(stream):
            pass
        spans.append((start, stream.tell()))
    spans.append((stream.tell(), len(data)))
    return spans


def _mutate_legacy(data, max_size, rng):
    spans = _pickle_spans(data)
    weights = [1, 1, 1, 6, 2, 2][:len(spans)]
    start, end = spans[rng.choices(range(len(spans)), weights)[0]]
    return data[:start] + _mutate(data[start:end], max_size // 2, rng) + data[end:]


def _mutate_safetensors(data, max_size, rng):
    length = int.from_bytes(data[:8], "little")
    if not 2 <= length <= len(data) - 8:
        raise ValueError("no header")
    header = _mutate(data[8:8 + length], max_size // 2, rng)
    size = len(header) if rng.random() < 0.9 else rng.choice([0, 1, len(header) + 1, 2**63, 2**64 - 1])
    return size.to_bytes(8, "little") + header + data[8 + length:]


def mutator(fmt):
    def mutate(data, max_size, seed):
        rng = random.Random(seed)
        if rng.random() < 0.8:
            try:
                if fmt == "torch_zip":
                    out = _mutate_zip(data, max_size, rng, prefer="data.pkl")
                elif fmt == "npz":
                    out = _mutate_zip(data, max_size, rng, prefer=".npy")
                elif fmt == "legacy":
                    out = _mutate_legacy(data, max_size, rng)
                else:
                    out = _mutate_safetensors(data, max_size, rng)
                if len(out) <= max_size:
                    return out
            except Exception:  # the input no longer has the structure: mutate its bytes
                pass
        return atheris.Mutate(data, max_size)
    return mutate


def main(argv):
    if len(argv) < 2 or argv[1] not in FORMATS:
        sys.exit(f"usage: {argv[0]} {{{','.join(FORMATS)}}} [libFuzzer options] [corpus dirs]")
    fmt = argv.pop(1)
    # Seed a fresh corpus directory (the first one given, or a temporary one) from the seeds.
    dirs = [a for a in argv[1:] if not a.startswith("-")]
    if not dirs:
        dirs = [tempfile.mkdtemp(prefix=f"fastbn-fuzz-{fmt}-")]
        argv.append(dirs[0])
    for name, data in seeds(fmt):
        with open(os.path.join(dirs[0], f"seed-{name}"), "wb") as f:
            f.write(data)
    if not any(a.startswith("-max_len=") for a in argv):
        argv.insert(1, f"-max_len={MAX_SIZE}")
    atheris.Setup(argv, Target(fmt), custom_mutator=mutator(fmt))
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)

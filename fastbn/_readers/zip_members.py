"""Zip archives (torch.save's format and .npz), read so that no header can make the reader
allocate, inflate or view more than the file holds.

zipfile trusts a member's headers: it returns a member short, without error, when the header
claims more bytes than the member stores (with a CRC of what it stores), inflates whatever
the header allows, and raises a handful of exception classes on damaged archives.  Here:

* a member is read only if it is stored or deflated (what torch.save and numpy write; bz2
  and LZMA are refused), not encrypted, and its sizes agree: a stored member's two sizes are
  equal, a deflated one claims at most deflate's largest ratio (``DEFLATE_MAX_RATIO``) of
  what it stores;
* the members read may not share compressed bytes beyond the file's length (overlapping
  members would inflate one stream many times);
* the bytes returned are the bytes actually read, checked against the header's size;
* every failure is a CheckpointError naming the file and the member.
"""

import zipfile

from .errors import CheckpointError, excerpt, shown

#: The most bytes deflate can produce per byte of input (a run of 258-byte matches costs a
#: little under 2 bits each): a member claiming more is lying about its size.
DEFLATE_MAX_RATIO = 1032

# The general-purpose flag bits zipfile cannot read, or can only read with a password.
_ENCRYPTED = 0x1 | 0x40
_PATCHED = 0x20

_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated",
            zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA"}


class ZipMembers:
    """The members of a zip archive at ``path``, read under the rules above.  Use as a
    context manager; ``names`` lists the members in the archive's order."""

    def __init__(self, path, file_size):
        self.path = path
        self._file_size = file_size
        self._compressed_read = 0
        try:
            self._archive = zipfile.ZipFile(path)
            infos = self._archive.infolist()
        except Exception as exc:  # BadZipFile, EOFError, OSError (a negative seek),
            # UnicodeDecodeError (a member name), struct.error, ValueError, ...
            self.close()
            raise CheckpointError(f"{path}: corrupt or truncated zip archive: "
                                  f"{excerpt(exc)}") from None
        self._infos = {}
        for info in infos:
            if info.filename in self._infos:  # (which one would a reader take?)
                self.close()
                raise CheckpointError(f"{path}: the zip archive holds two members named "
                                      f"{shown(info.filename, 80)}")
            self._infos[info.filename] = info
        self.names = list(self._infos)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        archive = getattr(self, "_archive", None)
        if archive is not None:
            archive.close()

    def size(self, name):
        """The size the member's header claims, or None if there is no such member."""
        info = self._infos.get(name)
        return None if info is None else info.file_size

    def read(self, name, *, limit=None, max_ratio=DEFLATE_MAX_RATIO):
        """The member's bytes, all of them, after the checks above; ``limit`` refuses a
        member claiming more bytes, ``max_ratio`` one deflated more than that many times
        (beyond 1 MiB), before anything is inflated."""
        info = self._infos[name]
        where = f"{self.path}: member {shown(name, 80)}"
        if info.flag_bits & _ENCRYPTED:
            raise CheckpointError(f"{where} is encrypted; checkpoints are not")
        if info.flag_bits & _PATCHED:
            raise CheckpointError(f"{where} holds compressed patched data (flag bit 5), which "
                                  f"fastbn does not read")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            method = _METHODS.get(info.compress_type, f"method {info.compress_type}")
            raise CheckpointError(f"{where} is compressed with {method}; torch.save and numpy "
                                  f"write members stored or deflated, and fastbn reads only those")
        stored = info.compress_type == zipfile.ZIP_STORED
        if stored and info.file_size != info.compress_size:
            raise CheckpointError(f"{where} is stored uncompressed, but its header says it "
                                  f"holds {info.compress_size} bytes and unpacks to "
                                  f"{info.file_size}")
        if not stored and info.file_size > DEFLATE_MAX_RATIO * info.compress_size:
            raise CheckpointError(f"{where} claims {info.file_size} bytes from "
                                  f"{info.compress_size} deflated bytes, more than deflate "
                                  f"can produce ({DEFLATE_MAX_RATIO} to 1)")
        if not stored and info.file_size > max_ratio * info.compress_size + 2**20:
            raise CheckpointError(f"{where} inflates {info.file_size} bytes from "
                                  f"{info.compress_size}, more than {max_ratio} times (plus 1 MiB)")
        if limit is not None and info.file_size > limit:
            raise CheckpointError(f"{where} claims {info.file_size} bytes; at most {limit} "
                                  f"are expected there")
        self._compressed_read += info.compress_size
        if self._compressed_read > self._file_size:
            raise CheckpointError(f"{self.path}: its members claim more compressed bytes than "
                                  f"the file's {self._file_size} (members overlap)")
        try:
            with self._archive.open(info) as member:
                # (zipfile never returns more than the header's size, and checks the CRC
                # once it has returned that many)
                data = member.read(info.file_size)
        except Exception as exc:  # BadZipFile (CRC, header), zlib.error, EOFError, OSError, ...
            raise CheckpointError(f"{where} is corrupt: {excerpt(exc)}") from None
        # The bytes read, not the header's claim: a member may hold fewer than its header
        # says (with a CRC of what it holds), and zipfile then returns them short.
        if len(data) != info.file_size:
            raise CheckpointError(f"{where} holds {len(data)} bytes although its header says "
                                  f"{info.file_size}")
        return data

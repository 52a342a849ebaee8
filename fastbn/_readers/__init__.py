"""The checkpoint readers behind :mod:`fastbn.checkpoint`, one job per file.

Imports flow down this list:

* ``torch_zip``, ``legacy``, ``npz``, ``safetensors_file`` -- one format each: find the
  pickle and the storages' bytes, hand them on;
* ``zip_members`` -- zip members read so that no header can make the reader allocate,
  inflate or view more than the file holds (torch_zip and npz);
* ``unpickler`` -- the restricted unpickler: the allow-list, the stand-ins for torch's rebuild
  functions, and the argument for why a file cannot run code through it;
* ``pickle_walk`` -- bounds what unpickling may build, before it runs;
* ``arrays`` -- numpy arrays from storage bytes, checked against the bytes at hand;
* ``placeholders`` -- the inert objects the pickle builds, and the tensor geometry checks;
* ``elements`` -- how each torch dtype is stored; ``errors`` -- the exceptions, the error
  contract (``as_checkpoint_error``) and ``shown``.
"""

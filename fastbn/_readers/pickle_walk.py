"""A walk over a pickle's opcodes that bounds what unpickling it can cost, before it runs.

The checkpoint readers unpickle untrusted files with an allow-listed unpickler, which decides what
may be *called*; this module decides how much may be *built*.  Python's C unpickler trusts the
stream's structure: a tuple nested 300,000 deep used as a dict key overflows the C stack when
hashed, a few hundred bytes of shared references expand to 2**60 objects when hashed or
printed, and one memo index can ask for a table of 4 Gi entries.  check_structure reads the
opcodes once (pickletools.genops), models each one's effect on the stack and the memo, and
refuses such pickles with a CheckpointError naming the file; then it rewinds, and the unpickler
reads what the walk has vetted.
"""

import pickletools

from .errors import CheckpointError, excerpt

#: How deeply a pickle may nest containers (a torch state_dict nests a few levels).  Deeper
#: nesting is refused before anything is built: hashing or comparing a tuple nested some
#: hundred thousand deep recurses in C past the stack.
MAX_NESTING = 256

#: How many objects a pickle's structure may hold, beyond 16 per opcode, once its shared
#: references are counted as often as they are referred to (see check_structure): what
#: hashing, comparing or printing the structure may walk.  Without sharing every object takes
#: an opcode, so no state_dict comes near; a crafted pickle of 400 bytes can share its way to
#: 2**100.
MAX_EXPANSION = 2**22

#: How many keys of one dict or set may share a hash with another key of it.  Keys whose
#: hashes collide are compared with each other on every insertion -- quadratic time --
#: and ints and floats collide at will (k * (2**61 - 1) all hash to 0), tuples of them too.
MAX_COLLISIONS = 64

#: Opcodes that add items to the container below them and leave it there.
_IN_PLACE = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})

#: Opcodes that hash their items as keys: where the keys are among the items popped (in the
#: order popped, the top of the stack first).
_KEYS = {"SETITEM": slice(1, None, 2), "SETITEMS": slice(1, None, 2), "DICT": slice(1, None, 2),
         "ADDITEMS": slice(None), "FROZENSET": slice(None)}

#: Opcodes that call something with the items popped: an allowed callable may hash them
#: (OrderedDict, set and frozenset of a list do), so they count as hashed.
_CALLS = frozenset({"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST", "BUILD"})

#: Opcodes that build a tuple of the items popped.
_TUPLES = frozenset({"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"})

_MARK = object()


def _stack_effects():
    """Each opcode's effect on the stack, worked out once from pickletools' descriptions:
    (items popped below any mark, whether it pops down to a mark, items pushed, and 'put',
    'get' or 'mark' for the opcodes the walk follows by role)."""
    roles = {"PUT": "put", "BINPUT": "put", "LONG_BINPUT": "put", "MEMOIZE": "put",
             "GET": "get", "BINGET": "get", "LONG_BINGET": "get", "MARK": "mark"}
    effects = {}
    for op in pickletools.opcodes:
        before = list(op.stack_before)
        to_mark = pickletools.markobject in before
        below = before[:before.index(pickletools.markobject)] if to_mark else before
        fixed = sum(1 for kind in below if kind is not pickletools.stackslice)
        effects[op] = (fixed, to_mark, len(op.stack_after), roles.get(op.name))
    return effects


_EFFECTS = _stack_effects()


class _Hash:
    """Stands for an object of known hash, so that hash() of a tuple of them is the hash of
    the tuple of the objects (CPython's tuple hash depends only on its items' hashes)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return self.value


def _record(depth, size, value_hash=None):
    """An object's record: [depth, expanded size, placed, hash or None, the key hashes seen
    in it and how many collided (a dict's or set's, once keys are added), or None]."""
    return [depth, size, False, value_hash, None, 0]


def _scalar(op, arg):
    """The record of a value pushed from an opcode's argument: its hash where the walk knows
    it, and its size weighted by what hashing or comparing it costs (an int's hash is not
    cached and takes time in proportion to its digits)."""
    if op.name in ("NONE", "NEWTRUE", "NEWFALSE"):
        return _record(0, 1, hash({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[op.name]))
    if isinstance(arg, (int, float, str, bytes)) and not isinstance(arg, bool):
        size = 1 + (arg.bit_length() // 512 if isinstance(arg, int) else 0)
        return _record(0, size, hash(arg))
    return _record(0, 1)


def check_structure(file, path, what):
    """Walk the pickle at the file's position once, without building anything, and refuse
    nesting deeper than MAX_NESTING, structures that expand beyond MAX_EXPANSION objects when
    shared references are followed (hashing a tuple of shared tuples, or printing a list of
    shared lists, takes time exponential in the pickle's length), and memo indices far beyond
    what the pickle has stored (the unpickler would allocate a memo table of that size); then
    rewind.  Each object is tracked by a record (see _record), one per object and shared by the
    stack and the memo, so that a container filled after it was memoized (as picklers write
    them) is counted in full wherever it is referred to.  A container may not grow once it has
    been placed in another (its parent's count would go stale): picklers fill a container
    before they place it, except in recursive structures, which no state_dict holds.

    Hashing is bounded over the whole pickle, not only per structure: everything inserted as
    a key, or passed to a call, counts its expanded size once more, in total at most
    MAX_EXPANSION plus 16 per opcode (a thousand discarded dicts keyed by one shared tuple
    hash it a thousand times); and a dict or set may hold at most MAX_COLLISIONS keys whose
    hash another of its keys has (the walk knows the hashes of scalars and of tuples of them).

    The walk reads the bytes in the order the unpickler does.  Inside a FRAME the C unpickler
    reads from the frame's buffer, and an opcode whose argument runs past the frame's end is
    read afresh from the file after it, the rest of the frame skipped -- the walk, which reads
    on, would then vet other bytes than the unpickler runs.  So an opcode may not cross the end
    of its frame, nor a frame begin inside another (as pickle's own Python unpickler says).
    A pickle the walk cannot read to its STOP is refused too: the unpickler accepts some
    spellings the walk's parser does not (INT's '0x10'), and what follows them would go
    unchecked."""
    start = file.tell()
    stack, memo, ops, hashed = [], {}, 0, 0
    frame_end = previous = None
    problem = None
    opcodes = pickletools.genops(file)
    while problem is None:
        try:
            op, arg, position = next(opcodes)
        except StopIteration:  # (genops stops after STOP)
            break
        except ValueError as exc:  # truncated, or not in the form pickle writes
            problem = f"malformed pickle: {excerpt(exc)}"
            break
        ops += 1
        budget = MAX_EXPANSION + 16 * ops
        if frame_end is not None:
            if previous < frame_end < position:
                problem = (f"an opcode at byte {previous} crosses the end of its frame at "
                           f"{frame_end}")
                break
            if position >= frame_end:
                frame_end = None
        if op.name == "FRAME":
            if frame_end is not None:
                problem = f"a frame begins at byte {position}, inside another"
                break
            frame_end = position + 9 + arg
        previous = position
        fixed, to_mark, pushes, role = _EFFECTS[op]
        if role is not None:
            if role == "put":
                index = len(memo) if arg is None else arg
                if not isinstance(index, int) or index > 4 * ops + 64:
                    shown = index if isinstance(index, int) and index.bit_length() <= 64 else "?"
                    problem = (f"memo index {shown} out of proportion to the pickle's {ops} "
                               f"opcodes so far")
                memo[index] = stack[-1] if stack and stack[-1] is not _MARK else _record(0, 1)
            elif role == "get":
                stack.append(memo.get(arg, _record(0, 1)))
            else:  # MARK
                stack.append(_MARK)
            continue
        if not fixed and not to_mark:  # a value pushed from the opcode's argument
            if pushes:
                stack.append(_scalar(op, arg))
            continue
        if op.name == "POP" and stack and stack[-1] is _MARK:
            stack.pop()  # (POP on a mark removes the mark, as the unpickler does)
            continue
        popped = []
        if to_mark:
            while stack:
                top = stack.pop()
                if top is _MARK:
                    break
                popped.append(top)
        for _ in range(fixed):
            if stack and stack[-1] is not _MARK:
                popped.append(stack.pop())
        if op.name in _CALLS:
            hashed += sum(item[1] for item in popped)
        if not pushes:
            continue
        in_place = role is None and op.name in _IN_PLACE and popped
        if in_place:
            record = popped[-1]  # the container (the deepest popped), grown in place
            items = popped[:-1]
            if items and record[2]:
                problem = ("a container grows after it was placed in another (a recursive "
                           "structure, which no state_dict has)")
            for item in items:
                item[2] = True
            if items:
                record[0] = max(record[0], 1 + max(item[0] for item in items))
                record[1] += sum(item[1] for item in items)
        elif op.name == "DUP" and popped:
            record = popped[0]  # (the same object twice)
            items = []
        else:
            items = popped
            for item in popped:
                item[2] = True
            record = _record(1 + max((item[0] for item in popped), default=-1),
                             1 + sum(item[1] for item in popped))
            if op.name in _TUPLES and all(item[3] is not None for item in popped):
                record[3] = hash(tuple(_Hash(item[3]) for item in reversed(popped)))
        keys = _KEYS.get(op.name)
        if keys is not None and items:
            keys = items[keys]
            hashed += sum(key[1] for key in keys)
            seen = record[4] if record[4] is not None else set()
            collisions = 0 if record[4] is None else record[5]
            for key in keys:
                if key[3] is not None:
                    if key[3] in seen:
                        collisions += 1
                    seen.add(key[3])
            record[4:] = [seen, collisions]
            if collisions > MAX_COLLISIONS:
                problem = (f"more than {MAX_COLLISIONS} keys of one dict or set share their "
                           f"hash with another key (collisions make inserting them quadratic)")
        if record[0] > MAX_NESTING:
            problem = f"objects nested too deeply (more than {MAX_NESTING} levels)"
        elif record[1] > budget:
            problem = (f"shared references expand to more than {budget} objects from {ops} "
                       f"opcodes, a structure no state_dict has")
        elif hashed > budget:
            problem = (f"hashing would visit more than {budget} objects from {ops} opcodes "
                       f"(shared structures used as keys again and again)")
        stack.extend([record] * pushes)
    if problem is not None:
        raise CheckpointError(f"{path}: could not read {what}: {problem}")
    file.seek(start)

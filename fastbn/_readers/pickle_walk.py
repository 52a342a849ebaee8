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

#: Opcodes that add items to the container below them and leave it there.
_IN_PLACE = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})

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


def check_structure(file, path, what):
    """Walk the pickle at the file's position once, without building anything, and refuse
    nesting deeper than MAX_NESTING, structures that expand beyond MAX_EXPANSION objects when
    shared references are followed (hashing a tuple of shared tuples, or printing a list of
    shared lists, takes time exponential in the pickle's length), and memo indices far beyond
    what the pickle has stored (the unpickler would allocate a memo table of that size); then
    rewind.  Each object is tracked by a record [depth, expanded size, placed], one per object
    and shared by the stack and the memo, so that a container filled after it was memoized (as
    picklers write them) is counted in full wherever it is referred to.  A container may not
    grow once it has been placed in another (its parent's count would go stale): picklers
    fill a container before they place it, except in recursive structures, which no
    state_dict holds.  A pickle the walk
    cannot read to its STOP is refused too: the unpickler accepts some spellings the walk's
    parser does not (INT's '0x10'), and what follows them would go unchecked."""
    start = file.tell()
    stack, memo, ops = [], {}, 0
    problem = None
    opcodes = pickletools.genops(file)
    while problem is None:
        try:
            op, arg, _ = next(opcodes)
        except StopIteration:  # (genops stops after STOP)
            break
        except ValueError as exc:  # truncated, or not in the form pickle writes
            problem = f"malformed pickle: {excerpt(exc)}"
            break
        ops += 1
        fixed, to_mark, pushes, role = _EFFECTS[op]
        if role is not None:
            if role == "put":
                index = len(memo) if arg is None else arg
                if not isinstance(index, int) or index > 4 * ops + 64:
                    shown = index if isinstance(index, int) and index.bit_length() <= 64 else "?"
                    problem = (f"memo index {shown} out of proportion to the pickle's {ops} "
                               f"opcodes so far")
                memo[index] = stack[-1] if stack and stack[-1] is not _MARK else [0, 1, False]
            elif role == "get":
                stack.append(memo.get(arg, [0, 1, False]))
            else:  # MARK
                stack.append(_MARK)
            continue
        if not fixed and not to_mark:  # a value pushed from the opcode's argument
            if pushes:
                stack.append([0, 1, False])
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
        if not pushes:
            continue
        if role is None and op.name in _IN_PLACE and popped:
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
        else:
            for item in popped:
                item[2] = True
            record = [1 + max((item[0] for item in popped), default=-1),
                      1 + sum(item[1] for item in popped), False]
        if record[0] > MAX_NESTING:
            problem = f"objects nested too deeply (more than {MAX_NESTING} levels)"
        elif record[1] > MAX_EXPANSION + 16 * ops:
            problem = (f"shared references expand to more than {MAX_EXPANSION + 16 * ops} "
                       f"objects from {ops} opcodes, a structure no state_dict has")
        stack.extend([record] * pushes)
    if problem is not None:
        raise CheckpointError(f"{path}: could not read {what}: {problem}")
    file.seek(start)

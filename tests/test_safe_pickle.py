"""The restricted dataset unpickler: its allow-list exactly, every genuine way a batch is pickled
still loads (checked against numpy's own unpickling of the same bytes), and each checked stand-in
refuses its misuse while accepting the genuine use."""
import pickle

import numpy as np
import pytest

import hostile_files as hf
from aerl_fast.data import safe_pickle
from aerl_fast.data.safe_pickle import UnsafePickleError, loads_dataset_pickle
from cifar_files import py2_pickle

GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


def test_the_allow_list_is_exactly_the_globals_dataset_batches_name():
    assert set(safe_pickle._ALLOWED) == GLOBALS


def _batch(rng, dtype="u1", shape=(5, 3072)):
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    data = (rng.integers(info.min, info.max, shape, endpoint=True) if info else rng.standard_normal(shape)).astype(dtype)
    return {"batch_label": "training batch 1 of 5", "labels": [int(v) for v in rng.integers(0, 10, shape[0])],
            "data": data, "filenames": [f"f{i}.png" for i in range(shape[0])]}


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("dtype", ["u1", "<i8", ">i4", ">f8", "?"])
@pytest.mark.parametrize("fortran", [False, True])
def test_every_python3_pickle_of_a_batch_loads_as_numpy_unpickles_it(protocol, dtype, fortran):
    rng = np.random.default_rng(protocol * 7 + len(dtype))
    d = _batch(rng, dtype, (4, 6))
    if fortran:
        d["data"] = np.asfortranarray(d["data"])
    raw = pickle.dumps(d, protocol=protocol)
    ref = pickle.loads(raw)  # the reference: our own trusted bytes, numpy's own reconstruction
    got = loads_dataset_pickle(raw, encoding="latin1")
    assert type(got["data"]) is np.ndarray and got["data"].dtype == ref["data"].dtype
    np.testing.assert_array_equal(got["data"], ref["data"])
    assert got["labels"] == ref["labels"] and got["filenames"] == ref["filenames"]


def test_python2_batch_loads_under_bytes_and_latin1():
    rng = np.random.default_rng(2)
    d = _batch(rng)
    raw = py2_pickle(d)
    got = loads_dataset_pickle(raw)
    np.testing.assert_array_equal(got[b"data"], d["data"])
    assert got[b"labels"] == d["labels"] and got[b"filenames"][0] == b"f0.png"
    latin = loads_dataset_pickle(raw, encoding="latin1")
    np.testing.assert_array_equal(latin["data"], d["data"])


def test_shared_and_cyclic_references_load():
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    loop = [arr]
    loop.append(loop)
    got = loads_dataset_pickle(pickle.dumps({"a": arr, "b": [arr, (arr,)], "loop": loop}, protocol=2))
    assert got["a"] is got["b"][0] and type(got["a"]) is np.ndarray
    assert got["loop"][1] is got["loop"]
    np.testing.assert_array_equal(got["b"][1][0], arr)


# ------------------------------------------------------------------ stand-ins: misuse refused

def _reconstruct_with(subtype=b"cnumpy\nndarray\n", shape=b"K\x00\x85", typecode=b"U\x01b"):
    return (hf.PROTO2 + b"cnumpy.core.multiarray\n_reconstruct\n" + subtype + shape + typecode + b"\x87R.")


@pytest.mark.parametrize("payload, match", [
    (_reconstruct_with(subtype=b"cnumpy\ndtype\n"), "_reconstruct of anything but a plain numpy array"),
    (_reconstruct_with(typecode=b"U\x01O"), "_reconstruct of anything but a plain numpy array"),
    (_reconstruct_with(shape=b"J\x00\x00\x01\x00\x85"), "array of 65536 elements"),
    (_reconstruct_with(shape=b"U\x03abc\x85"), "not a tuple of sizes"),
    (hf.PROTO2 + b"cnumpy\nndarray\nK\x05\x85R.", "refusing to call numpy.ndarray directly"),
    (hf.PROTO2 + b"cnumpy\nndarray\n)\x81.", "refusing to call numpy.ndarray directly"),  # NEWOBJ
])
def test_reconstruct_and_ndarray_refuse_misuse(payload, match):
    with pytest.raises(UnsafePickleError, match=match):
        loads_dataset_pickle(payload)
    assert loads_dataset_pickle(_reconstruct_with()).shape == (0,)  # the genuine call


@pytest.mark.parametrize("spec", [b"O", b"O8", b"V8", b"S5", b"U3", b"i,i", b"M8", b"bogus"])
def test_dtype_refuses_anything_but_plain_numbers(spec):
    payload = hf.PROTO2 + b"cnumpy\ndtype\nU" + bytes([len(spec)]) + spec + b"\x89\x88\x87R."
    with pytest.raises(UnsafePickleError, match="dtype"):
        loads_dataset_pickle(payload)


@pytest.mark.parametrize("state", [
    b"(K\x03U\x01|NN(U\x01aK\x00tNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t",  # names
    b"(K\x03U\x01|NNNK\x08J\xff\xff\xff\xffK\x00t",                           # elsize
    b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?t",                   # flags (object)
    b"(K\x03U\x01!NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t",               # byte order
])
def test_dtype_state_with_fields_sizes_or_flags_is_refused(state):
    payload = hf.PROTO2 + b"cnumpy\ndtype\nU\x02u1\x89\x88\x87R" + state + b"b."
    with pytest.raises(UnsafePickleError, match="dtype state"):
        loads_dataset_pickle(payload)


def _array(raw_op: bytes, shape=b"K\x04\x85", dtype_spec=b"u1"):
    return (hf.PROTO2 + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
            + b"(K\x01" + shape + b"cnumpy\ndtype\nU" + bytes([len(dtype_spec)]) + dtype_spec + b"\x89\x88\x87R"
            + b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb" + b"\x89" + raw_op + b"tb.")


def test_array_state_must_hold_exactly_its_bytes():
    np.testing.assert_array_equal(loads_dataset_pickle(_array(b"C\x04abcd")), np.frombuffer(b"abcd", np.uint8))
    with pytest.raises(UnsafePickleError, match=r"needs 4 bytes, the file gives 3"):
        loads_dataset_pickle(_array(b"C\x03abc"))
    with pytest.raises(UnsafePickleError, match="array data of type list"):  # how object arrays are pickled
        loads_dataset_pickle(_array(b"](K\x01K\x02K\x03K\x04e"))


def test_codecs_encode_only_spells_latin1_bytes():
    genuine = hf.PROTO2 + b"c_codecs\nencode\nX\x02\x00\x00\x00\xc3\xbf" + hf._unicode("latin1") + b"\x86R."
    assert loads_dataset_pickle(genuine) == b"\xff"
    for encoding in (b"rot13", b"hex", b"utf-8", b"zlib"):
        bad = hf.PROTO2 + b"c_codecs\nencode\nX\x01\x00\x00\x00a" + hf._unicode(encoding.decode()) + b"\x86R."
        with pytest.raises(UnsafePickleError, match="only latin1 strings"):
            loads_dataset_pickle(bad)


def test_frombuffer_checks_bytes_dtype_shape_and_order():
    raw = pickle.dumps(np.arange(6, dtype=np.uint8).reshape(2, 3), protocol=5)
    np.testing.assert_array_equal(loads_dataset_pickle(raw), np.arange(6).reshape(2, 3))
    with pytest.raises(UnsafePickleError, match=r"needs 12 bytes, the file gives 6"):
        loads_dataset_pickle(raw.replace(b"K\x02K\x03\x86", b"K\x04K\x03\x86"))
    with pytest.raises(UnsafePickleError, match="order 'X'"):
        loads_dataset_pickle(raw.replace(b"\x8c\x01C", b"\x8c\x01X"))


def test_budget_is_shared_by_all_arrays_and_strings_of_one_file():
    """The same bytes handed to many arrays, or one string encoded many times, is refused once the
    total exceeds the file's size; a genuine file spends less than its size."""
    with pytest.raises(UnsafePickleError, match="encoded string"):
        loads_dataset_pickle(hf.repeated_encode_bomb(copies=200, size=1000))
    assert len(loads_dataset_pickle(hf.repeated_encode_bomb(copies=1, size=1000))) == 1
    arr = np.zeros(1000, np.uint8)
    shared = pickle.dumps([arr] * 3, protocol=2)  # memoised: one array, built once
    assert len(loads_dataset_pickle(shared)) == 3


def test_prescan_refuses_lengths_and_indexes_the_file_cannot_back():
    for bomb, match in ((hf.memo_bomb(), "memo index 4294967295"), (hf.bytes8_bomb(), "expected 10000000000 bytes"),
                        (b"\x80\x04\x95" + (10 ** 9).to_bytes(8, "little") + b"N.", "frame of 1000000000 bytes")):
        with pytest.raises(pickle.UnpicklingError, match=match):
            loads_dataset_pickle(bomb)
    # framed protocol-4 pickles with memo indexes below the file size load
    assert loads_dataset_pickle(pickle.dumps([b"x"] * 300, protocol=4)) == [b"x"] * 300

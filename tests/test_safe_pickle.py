"""The restricted dataset unpickler: its allow-list exactly, every genuine way a batch is pickled
still loads (checked against numpy's own unpickling of the same bytes), and each checked stand-in
refuses its misuse while accepting the genuine use."""
import pickle
import re

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
    arr, other = np.arange(12, dtype=np.uint8).reshape(3, 4), np.full(5, 7, np.uint8)
    loop = [arr]
    loop.append(loop)
    got = loads_dataset_pickle(pickle.dumps({"a": arr, "b": [arr, (arr,)], "c": other, "loop": loop}, protocol=2))
    assert got["a"] is got["b"][0] and type(got["a"]) is np.ndarray
    np.testing.assert_array_equal(got["c"], other)  # a different array stays different
    assert got["loop"][1] is got["loop"]
    np.testing.assert_array_equal(got["b"][1][0], arr)


@pytest.mark.parametrize("value", [5, "text", None, b"raw", 2.5])
def test_a_file_holding_one_plain_value_loads(value):
    assert loads_dataset_pickle(pickle.dumps(value, protocol=2)) == value


# ------------------------------------------------------------------ stand-ins: misuse refused

def _reconstruct_with(subtype=b"cnumpy\nndarray\n", shape=b"K\x00\x85", typecode=b"U\x01b"):
    return (hf.PROTO2 + b"cnumpy.core.multiarray\n_reconstruct\n" + subtype + shape + typecode + b"\x87R.")


BIG = _reconstruct_with(shape=b"J\x00\x00\x01\x00\x85")  # (65536,) from a file of 65 bytes


@pytest.mark.parametrize("payload, match", [
    (_reconstruct_with(subtype=b"cnumpy\ndtype\n"), r"^refusing _reconstruct of anything but a plain numpy array$"),
    (_reconstruct_with(typecode=b"U\x01O"), r"^refusing _reconstruct of anything but a plain numpy array$"),
    (BIG, rf"^refusing an array of 65536 elements \(65536 bytes\): more than the file's remaining {len(BIG)} "
          rf"bytes can hold$"),
    (_reconstruct_with(shape=b"U\x03abc\x85"), r"^refusing array shape \(b'abc',\): not a tuple of sizes$"),
    (hf.PROTO2 + b"cnumpy\nndarray\nK\x05\x85R.", "refusing to call numpy.ndarray directly"),
    (hf.PROTO2 + b"cnumpy\nndarray\n)\x81.", "refusing to call numpy.ndarray directly"),  # NEWOBJ
])
def test_reconstruct_and_ndarray_refuse_misuse(payload, match):
    with pytest.raises(UnsafePickleError, match=match):
        loads_dataset_pickle(payload)
    assert loads_dataset_pickle(_reconstruct_with()).shape == (0,)  # the genuine call


@pytest.mark.parametrize("spec", [b"O", b"O8", b"V8", b"S5", b"U3", b"i,i", b"(2,)i4", b"M8", b"m8", b"c8",
                                  b"f16", b"bogus", b"i" * 300])
def test_dtype_refuses_anything_but_plain_numbers_of_at_most_8_bytes(spec):
    payload = hf.PROTO2 + b"cnumpy\ndtype\nT" + len(spec).to_bytes(4, "little") + spec + b"\x89\x88\x87R."
    with pytest.raises(UnsafePickleError, match=rf"^refusing numpy dtype {re.escape(repr(spec.decode()))}: "
                                                rf"(a dataset batch holds plain numbers|not a number type)$"):
        loads_dataset_pickle(payload)
    with pytest.raises(UnsafePickleError, match=r"^refusing numpy dtype of int: a dataset batch holds plain numbers$"):
        loads_dataset_pickle(hf.PROTO2 + b"cnumpy\ndtype\nK\x05\x85R.")


@pytest.mark.parametrize("spec", ["u1", "b1", "i2", "<i4", ">u8", "f4", ">f8", "i", "bool"])
def test_dtype_accepts_plain_numbers(spec):
    arr = np.arange(3).astype(spec)
    np.testing.assert_array_equal(loads_dataset_pickle(pickle.dumps(arr, protocol=2)), arr)


M1 = b"J\xff\xff\xff\xff"  # -1


@pytest.mark.parametrize("state", [
    b"(K\x03U\x01|NN(U\x01aK\x00tN" + M1 + M1 + b"K\x00t",   # names
    b"(K\x03U\x01|NNNK\x08" + M1 + b"K\x00t",                 # elsize
    b"(K\x03U\x01|NNN" + M1 + M1 + b"K?t",                      # flags (object)
    b"(K\x03U\x01!NNN" + M1 + M1 + b"K\x00t",                  # byte order
    b"(K\x05U\x01|NNN" + M1 + M1 + b"K\x00t",                  # version
    b"(K\x04U\x01|NNN" + M1 + M1 + b"K\x00}t",                 # metadata
    b"(K\x03t",                                                  # too short
    b"K\x03",                                                    # not a tuple
])
def test_dtype_state_with_fields_sizes_flags_or_metadata_is_refused(state):
    payload = hf.PROTO2 + b"cnumpy\ndtype\nU\x02u1\x89\x88\x87R" + state + b"b."
    with pytest.raises(UnsafePickleError, match=r"^refusing dtype state .*: not a plain number type$"):
        loads_dataset_pickle(payload)


@pytest.mark.parametrize("state, order", [
    (b"(K\x03U\x01=NNN" + M1 + M1 + b"K\x00t", "="),
    (b"(K\x04X\x01\x00\x00\x00>NNN" + M1 + M1 + b"K\x00Nt", ">"),  # version 4: metadata None
    (b"(K\x03C\x01<NNN" + M1 + M1 + b"K\x00t", "<"),                   # byte order as bytes
])
def test_dtype_state_of_plain_numbers_is_accepted(state, order):
    payload = hf.PROTO2 + b"cnumpy\ndtype\nU\x02i4\x89\x88\x87R" + state + b"b."
    got = loads_dataset_pickle(payload).dtype
    assert got == np.dtype("i4").newbyteorder(order if order != "=" else "=")


def _array(raw_op: bytes, shape=b"K\x04\x85", dtype_spec=b"u1"):
    return (hf.PROTO2 + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
            + b"(K\x01" + shape + b"cnumpy\ndtype\nU" + bytes([len(dtype_spec)]) + dtype_spec + b"\x89\x88\x87R"
            + b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb" + b"\x89" + raw_op + b"tb.")


def test_array_state_must_hold_exactly_its_bytes():
    np.testing.assert_array_equal(loads_dataset_pickle(_array(b"C\x04abcd")), np.frombuffer(b"abcd", np.uint8))
    with pytest.raises(UnsafePickleError, match=r"^array of shape \(4,\) needs 4 bytes, the file gives 3$"):
        loads_dataset_pickle(_array(b"C\x03abc"))
    with pytest.raises(UnsafePickleError, match="array data of type list"):  # how object arrays are pickled
        loads_dataset_pickle(_array(b"](K\x01K\x02K\x03K\x04e"))


@pytest.mark.parametrize("state, match", [
    (b"K\x07", r"^refusing array state of int: not a numpy array$"),
    (b"(K\x02K\x04\x85U\x02u1C\x04abcdt", r"^refusing array state of tuple: not a numpy array$"),  # 4 items
    (b"(K\x02K\x04\x85U\x02u1\x89C\x04abcdt", r"^refusing array state of tuple: not a numpy array$"),  # version 2
    (b"(K\x01K\x04\x85U\x02u1\x89C\x04abcdt",
     r"^refusing an array whose dtype is not a numpy.dtype of numbers$"),  # dtype as a plain string
])
def test_array_state_of_another_form_is_refused(state, match):
    payload = (hf.PROTO2 + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
               + state + b"b.")
    with pytest.raises(UnsafePickleError, match=match):
        loads_dataset_pickle(payload)


def test_one_python2_string_behind_many_arrays_is_refused_under_latin1():
    """Under encoding='latin1' a Python 2 str becomes str, and each array re-encodes it to bytes:
    one memoised 1000-byte string behind 50 arrays would make 50 copies from a ~1.5 KB file."""
    head = hf.PROTO2 + b"(" + b"U\xe8" + b"a" * 232 + b"q\x01" + b"0"  # a 232-byte string, memoised, popped
    arrays = b"".join(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
                      b"(K\x01K\xe8\x85cnumpy\ndtype\nU\x02u1\x89\x88\x87R(K\x03U\x01|NNN" + M1 + M1
                      + b"K\x00tb\x89h\x01tb" for _ in range(50))
    payload = head + arrays + b"l."
    assert len(loads_dataset_pickle(payload)) == 50  # encoding='bytes': the same bytes, counted once
    with pytest.raises(UnsafePickleError, match=r"^refusing array of shape \(232,\) \(232 bytes\): more than the "
                                                r"file's remaining \d+ bytes can hold$"):
        loads_dataset_pickle(payload, encoding="latin1")


def test_spend_refuses_only_beyond_the_budget():
    import io
    u = safe_pickle.DatasetUnpickler(io.BytesIO(b""), budget=10)
    u.spend(4, "x")
    u.spend(6, "y")  # exactly the budget
    assert u.budget == 0
    with pytest.raises(UnsafePickleError, match=r"^refusing z \(1 bytes\): more than the file's remaining 0 bytes"):
        u.spend(1, "z")


def test_codecs_encode_only_spells_latin1_bytes():
    genuine = hf.PROTO2 + b"c_codecs\nencode\nX\x02\x00\x00\x00\xc3\xbf" + hf._unicode("latin1") + b"\x86R."
    assert loads_dataset_pickle(genuine) == b"\xff"
    for encoding in (b"rot13", b"hex", b"utf-8", b"zlib"):
        bad = hf.PROTO2 + b"c_codecs\nencode\nX\x01\x00\x00\x00a" + hf._unicode(encoding.decode()) + b"\x86R."
        with pytest.raises(UnsafePickleError, match=rf"^refusing _codecs.encode\(<str>, '{encoding.decode()}'\): "
                                                    rf"only latin1 strings spell bytes in a dataset batch$"):
            loads_dataset_pickle(bad)
    with pytest.raises(UnsafePickleError, match=r"^refusing _codecs.encode\(<bytes>, 'latin1'\)"):
        loads_dataset_pickle(hf.PROTO2 + b"c_codecs\nencode\nC\x01a" + hf._unicode("latin1") + b"\x86R.")


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
    with pytest.raises(UnsafePickleError, match=r"^refusing an encoded string \(1000 bytes\): more than the file's"):
        loads_dataset_pickle(hf.repeated_encode_bomb(copies=200, size=1000))
    assert len(loads_dataset_pickle(hf.repeated_encode_bomb(copies=1, size=1000))) == 1
    arr = np.zeros(1000, np.uint8)
    shared = pickle.dumps([arr] * 3, protocol=2)  # memoised: one array, built once
    assert len(loads_dataset_pickle(shared)) == 3


def test_prescan_refuses_lengths_and_indexes_the_file_cannot_back():
    for bomb, match in ((hf.memo_bomb(), r"^refusing memo index 4294967295 at byte 3: a file of 9 bytes cannot fill it$"),
                        (hf.bytes8_bomb(), "expected 10000000000 bytes"),
                        (b"\x80\x04\x95" + (10 ** 9).to_bytes(8, "little") + b"N.",
                         r"^refusing a frame of 1000000000 bytes at byte 2: the file has 11 left$"),
                        (b"\x80\x04\x95" + (12).to_bytes(8, "little") + b"N.",  # the smallest refused: len - pos + 1
                         r"^refusing a frame of 12 bytes at byte 2: the file has 11 left$")):
        with pytest.raises(pickle.UnpicklingError, match=match):
            loads_dataset_pickle(bomb)
    # framed protocol-4 pickles with memo indexes below the file size load
    assert loads_dataset_pickle(pickle.dumps([b"x"] * 300, protocol=4)) == [b"x"] * 300

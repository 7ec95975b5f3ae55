"""The class table and ground truth against independent facts (the devkit's own numbers)."""

import numpy as np
import pytest

from dsimagenet import labels
from dsimagenet.errors import ConfigError
from dsimagenet.labels import IMAGENET


def test_thousand_distinct_wnids():
    assert len(IMAGENET) == 1000
    assert len(set(IMAGENET.wnids)) == 1000
    assert all(w.startswith("n") and len(w) == 9 and w[1:].isdigit() for w in IMAGENET.wnids)


def test_known_classes():
    # Facts from the devkit: kit fox is ID 1, tench is ID 449 and the first WNID in sorted order.
    assert IMAGENET.wnid(1) == "n02119789" and IMAGENET.name("n02119789") == "kit fox"
    assert IMAGENET.devkit_id("n01440764") == 449
    assert IMAGENET.sorted_index("n01440764") == 0
    assert IMAGENET.sorted_wnids[-1] == "n15075141"  # toilet tissue: the largest WNID
    assert IMAGENET.wnid(1000) == "n03255030"  # dumbbell: the last line of map_clsloc.txt


def test_orders_are_permutations_that_round_trip():
    d2s, s2d = IMAGENET.devkit_to_sorted, IMAGENET.sorted_to_devkit
    assert sorted(d2s.tolist()) == list(range(1000))
    assert sorted(s2d.tolist()) == list(range(1, 1001))
    np.testing.assert_array_equal(s2d[d2s], np.arange(1, 1001))
    np.testing.assert_array_equal(d2s[s2d - 1], np.arange(1000))
    assert d2s[449 - 1] == 0 and s2d[0] == 449
    # sorted order is string order of WNIDs, independently of the table's own sort
    by_hand = sorted(range(1000), key=lambda i: IMAGENET.wnids[i])
    np.testing.assert_array_equal(s2d, np.array(by_hand) + 1)


def test_table_rows():
    rows = IMAGENET.table("sorted")
    assert (rows[0].index, rows[0].wnid, rows[0].devkit_id, rows[0].name) == (0, "n01440764", 449, "tench")
    rows = IMAGENET.table("devkit")
    assert [r.devkit_id for r in rows] == list(range(1, 1001))
    assert [r.index for r in rows] == list(range(1000))
    with pytest.raises(ValueError, match="label order"):
        IMAGENET.table("alphabetical")


def test_lookups_reject_unknowns():
    with pytest.raises(KeyError, match="n00000000"):
        IMAGENET.devkit_id("n00000000")
    with pytest.raises(ValueError, match="1..1000"):
        IMAGENET.wnid(0)


def test_val_ground_truth():
    gt = labels.val_ground_truth()
    assert gt.shape == (50_000,)
    assert gt[:3].tolist() == [490, 361, 171]
    assert gt.min() == 1 and gt.max() == 1000
    assert np.bincount(gt, minlength=1001)[1:].tolist() == [50] * 1000  # 50 val images per class
    assert labels.val_label("ILSVRC2012_val_00000001.JPEG") == 490
    assert labels.val_label("val/ILSVRC2012_val_00050000.JPEG") == gt[-1]
    with pytest.raises(ValueError, match="not a validation image"):
        labels.val_label("ILSVRC2012_val_00050001.JPEG")
    with pytest.raises(ValueError):
        gt[0] = 1  # read-only: nobody can corrupt the shared copy


def test_subset_first_n():
    s = labels.subset(120)
    assert len(s) == 120
    assert s.devkit_ids.tolist() == list(range(1, 121))
    assert s.relabel(np.arange(1, 121)).tolist() == list(range(120))
    assert s.relabel(np.array([121, 1000])).tolist() == [-1, -1]
    with pytest.raises(ValueError, match="outside"):
        s.relabel(np.array([0]))


def test_subset_sorted_and_wnid_list():
    s = labels.subset(120, order="sorted")
    assert list(s.wnids) == sorted(IMAGENET.wnids[:120])
    s = labels.subset(["n01440764", "n02119789"])  # devkit 449 and 1: devkit order puts kit fox first
    assert s.wnids == ("n02119789", "n01440764")
    assert s.relabel(np.array([449, 1, 2])).tolist() == [1, 0, -1]
    assert labels.subset(["n02119789", "n01440764"], order="sorted").wnids == ("n01440764", "n02119789")
    assert len(labels.subset()) == 1000


@pytest.mark.parametrize("bad", [0, 1001, ["n00000000"], [], ["n01440764"] * 2, "n01440764", 3.5, [7]])
def test_subset_rejects(bad):
    with pytest.raises(ConfigError):  # one line from the CLI, never a traceback
        labels.subset(bad)


def test_a_subset_and_a_class_table_repr_is_one_line():
    from dsimagenet.labels import IMAGENET, ClassTable, subset

    assert repr(subset(10)) == ("ClassSubset(10 of 1,000 classes: n02119789 kit fox, n02100735 English setter, "
                                "n02110185 Siberian husky, ..., n02123394 Persian cat)")
    assert repr(subset(["n01440764"])) == "ClassSubset(1 of 1,000 classes: n01440764 tench)"
    assert "\n" not in repr(IMAGENET) and repr(IMAGENET).startswith("ClassTable(1,000 classes: n02119789 kit fox")
    assert repr(ClassTable(("cat",), ("cat",))) == "ClassTable(1 class: cat)"  # a folder's class: no name twice

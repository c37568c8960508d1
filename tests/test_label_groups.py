"""Exclusive label groups: where groups come from, which are exclusive, and what a trained run does with them."""

import numpy as np
import pytest

from xmctag import Config, UserError
from xmctag.io.datasets import LabelTable
from xmctag.label_groups import exclusive_groups, group_ids, group_names


def table(ids, groups=None) -> LabelTable:
    return LabelTable(ids=ids, texts=ids, display=ids, groups=groups)


def test_groups_come_from_the_column_else_from_facet_prefixes():
    prefixed = table(["colour:Blue", "colour:Red", "usage:Casual"])
    assert group_names(prefixed, Config()) == ["colour", "colour", "usage"]
    assert group_names(prefixed, Config(label_groups="none")) == [None] * 3
    with pytest.raises(UserError, match="no column group"):
        group_names(prefixed, Config(label_groups="column"))
    # auto: a label set that is not all "facet:value" ids has no groups; "prefix" groups what it can
    mixed = table(["colour:Blue", "1234", "colour:Red"])
    assert group_names(mixed, Config()) == [None] * 3
    assert group_names(mixed, Config(label_groups="prefix")) == ["colour", None, "colour"]
    # the column wins over prefixes; an empty value is no group
    column = table(["a:1", "b:2", "c:3"], groups=["size", "size", ""])
    assert group_names(column, Config()) == ["size", "size", None]


def test_a_group_is_exclusive_only_if_no_training_product_has_two_of_its_labels():
    names = ["colour", "colour", "tag", "tag", None]
    train = [np.array([0, 2, 3]), np.array([1, 2]), np.array([4, 0])]  # row 0 has two "tag" labels
    exclusive = exclusive_groups(names, train)
    assert exclusive == ["colour", "colour", None, None, None]
    assert group_ids(exclusive).tolist() == [0, 0, -1, -1, -1]
    assert group_ids([None, None]) is None and group_ids(None) is None

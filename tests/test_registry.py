from dataclasses import dataclass

import pytest

from subnet_interp._registry import Registry


def registry_with_one():
    reg = Registry("method")

    @reg.register
    @dataclass(frozen=True)
    class Foo:
        name = "foo"
        rate: float = 0.1

    return reg, Foo


def test_register_get_create_names():
    reg, foo = registry_with_one()
    assert reg.names() == ["foo"]
    assert reg.get("foo") is foo
    assert reg.create("foo", rate=0.5).rate == 0.5


def test_duplicate_name_raises_and_lists():
    reg, _ = registry_with_one()
    with pytest.raises(ValueError, match=r"'foo' is already registered.*Registered: \['foo'\]"):

        @reg.register
        @dataclass(frozen=True)
        class Other:
            name = "foo"


def test_unknown_name_lists_registered_and_suggests():
    reg, _ = registry_with_one()
    with pytest.raises(KeyError, match=r"Unknown method 'fo'.*Registered: \['foo'\].*Did you mean"):
        reg.get("fo")


def test_unknown_hparam_lists_fields():
    reg, _ = registry_with_one()
    with pytest.raises(TypeError, match=r"no hyper-parameter\(s\) \['lr'\].*\['rate'\]"):
        reg.create("foo", lr=1)


def test_non_frozen_class_is_refused():
    reg = Registry("method")
    with pytest.raises(TypeError, match="frozen dataclass"):

        @reg.register
        @dataclass
        class Mutable:
            name = "mutable"

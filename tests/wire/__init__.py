"""Tests of securechat.wire."""

"""Tests of securechat.store."""

"""Tests of securechat.server."""

"""Tests of securechat.client."""

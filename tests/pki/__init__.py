"""Tests of securechat.pki."""

"""Hydra configs of the lsgd-train app (a package so that Hydra can load them as ``pkg://lsgd_lightning.conf``)."""

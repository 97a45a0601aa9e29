"""OpenFL plan templates, one per method (Jinja2-rendered YAML); installed as ``fedfair_med.plans``."""

"""The seed's day on the five experts at their real sizes: see __main__.py."""

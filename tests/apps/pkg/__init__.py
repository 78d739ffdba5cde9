"""A package, so that dotted module paths (`pkg.web:main`) are exercised."""

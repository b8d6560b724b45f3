"""Sample schema, box conventions, readers for real formats, the embedded EO world, collation."""

# `make help`: every target with a "## text" comment on its rule line, and "##| text" lines as continuations.
/^[a-zA-Z0-9_-]+:([^=]|$).*## / {
    split($0, parts, "## ")
    target = substr(parts[1], 1, index(parts[1], ":") - 1)
    printf "make %-22s %s\n", target, parts[2]
    next
}
/^##\| / { printf "     %-22s %s\n", "", substr($0, 5) }

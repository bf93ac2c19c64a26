# Sourced first by the scripts that take their settings from variables, not arguments (source scripts/usage.sh "$@"):
# --help prints the comment block at the top of the script; any other argument is refused in one line.
case "${1:-}" in
  '') ;;
  -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;;
  *) echo "error: $0 takes its settings from variables (--help lists them), not the argument '$1'" >&2; exit 2 ;;
esac

# Never-shipped variants of this checkout (bench/experiments/), built from
# HEAD in a throwaway worktree into a target directory of their own,
# target/variants. Built into target/ they would leave their binary under
# this checkout's artifact name, newer than its sources, and the next
# `cargo build --release` here would take it as fresh and keep it.
# Sourced by bench/upper_bounds.sh and bench/hyper_floor.sh:
#   variants_begin OUT   a worktree of HEAD at OUT/tree, removed on exit
#   variant NAME         builds the worktree as it stands into OUT/NAME
#   variants_end         removes the worktree (before another EXIT trap)
VARIANT_TARGET=$PWD/target/variants
variants_begin() {
  VARIANT_OUT=$1
  TREE=$1/tree
  git worktree add -f --detach "$TREE" HEAD >/dev/null
  trap variants_end EXIT
}
variant() {
  (cd "$TREE" && CARGO_TARGET_DIR="$VARIANT_TARGET" cargo build --release --quiet)
  cp "$VARIANT_TARGET/release/creditgate" "$VARIANT_OUT/$1"
}
variants_end() {
  git worktree remove --force "$TREE" 2>/dev/null || true
  git worktree prune
  trap - EXIT
}

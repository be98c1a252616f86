// task<T>: values, void, exceptions through co_await, and a long chain of
// synchronously completing awaits at constant stack depth.
#include "support.hpp"

extern const bool test_needs_database = false;

using namespace test;

namespace {

task<int> answer() { co_return 42; }
task<std::string> text() { co_return std::string(1000, 'x'); }
task<void> nothing(int& touched) {
  ++touched;
  co_return;
}
task<int> fails() {
  throw std::runtime_error("boom");
  co_return 0;
}
task<int> add_one(task<int> inner) {
  int v = co_await std::move(inner);
  co_return v + 1;
}
task<int> catches() {
  try {
    co_await fails();
  } catch (const std::runtime_error& e) {
    co_return std::string(e.what()) == "boom" ? 1 : 2;
  }
  co_return 3;
}
task<long> chain(long n) {
  long sum = 0;
  for (long i = 0; i < n; ++i) sum += co_await answer();
  co_return sum;
}
struct move_only {
  std::unique_ptr<int> p;
};
task<move_only> make_move_only() { co_return move_only{std::make_unique<int>(7)}; }

}  // namespace

TEST_CASE("task returns values, strings and move-only types", "[task]") {
  event_loop loop;
  CHECK(loop.run(answer()) == 42);
  CHECK(loop.run(text()).size() == 1000);
  auto m = loop.run(make_move_only());
  REQUIRE(m.p);
  CHECK(*m.p == 7);
  CHECK(loop.run(add_one(add_one(answer()))) == 44);
}

TEST_CASE("task<void> runs its body exactly once", "[task]") {
  event_loop loop;
  int touched = 0;
  loop.run(nothing(touched));
  CHECK(touched == 1);
}

TEST_CASE("a task is lazy: nothing runs until it is awaited", "[task]") {
  int touched = 0;
  {
    auto t = nothing(touched);
    CHECK(touched == 0);
  }  // destroyed unstarted: no leak (the sanitizer build checks)
  CHECK(touched == 0);
}

TEST_CASE("exceptions propagate through co_await and out of run()", "[task]") {
  event_loop loop;
  CHECK_THROWS_WITH(loop.run(fails()), "boom");
  CHECK_THROWS_WITH(loop.run(add_one(fails())), "boom");
  CHECK(loop.run(catches()) == 1);
}

TEST_CASE("a million synchronously completing awaits do not grow the stack", "[task]") {
  event_loop loop;
  CHECK(loop.run(chain(1000000)) == 42L * 1000000);
}

// redis_query_store against a real redis-server: each test starts its own
// child server on a free loopback port (no persistence) and kills it at the
// end. Skipped, with the reason, only when redis-server is not installed
// (`./run test` installs it). The only waits are bounded polls for the child
// to answer PING, for an entry to expire, and for a killed child to exit.
#include "actors/redis_query_store.hpp"
#include "actors/messages.hpp"
#include "actors/node.hpp"
#include "actors/query_cache_actor.hpp"

#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <arpa/inet.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/scoped_actor.hpp>

extern char** environ;

namespace kvfleet::actors {
namespace {

using namespace std::chrono_literals;

std::optional<std::string> find_redis_server() {
  const char* path = std::getenv("PATH");
  std::string dirs = path != nullptr ? path : "/usr/bin:/usr/sbin";
  dirs += ":/usr/bin:/usr/sbin";
  std::size_t start = 0;
  while (start <= dirs.size()) {
    auto end = dirs.find(':', start);
    if (end == std::string::npos)
      end = dirs.size();
    auto candidate = dirs.substr(start, end - start) + "/redis-server";
    if (end > start && ::access(candidate.c_str(), X_OK) == 0)
      return candidate;
    start = end + 1;
  }
  return std::nullopt;
}

std::uint16_t free_loopback_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  EXPECT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  std::uint16_t port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0)
    port = ntohs(addr.sin_port);
  ::close(fd);
  return port;
}

struct context_deleter {
  void operator()(redisContext* c) const noexcept { redisFree(c); }
};
using context_ptr = std::unique_ptr<redisContext, context_deleter>;
struct reply_deleter {
  void operator()(redisReply* r) const noexcept { freeReplyObject(r); }
};
using reply_ptr = std::unique_ptr<redisReply, reply_deleter>;

/// A direct connection for checking what the store wrote.
context_ptr connect_direct(std::uint16_t port) {
  context_ptr c{
      redisConnectWithTimeout("127.0.0.1", port, timeval{0, 200'000})};
  if (c && c->err != 0)
    c.reset();
  return c;
}

reply_ptr command(redisContext* c, std::vector<std::string> args) {
  std::vector<const char*> argv;
  std::vector<std::size_t> lens;
  for (auto& a : args) {
    argv.push_back(a.data());
    lens.push_back(a.size());
  }
  return reply_ptr{static_cast<redisReply*>(redisCommandArgv(
      c, static_cast<int>(argv.size()), argv.data(), lens.data()))};
}

/// One redis-server child process on 127.0.0.1:port.
class redis_child {
public:
  redis_child(std::string binary, std::uint16_t port)
      : binary_(std::move(binary)), port_(port) {}
  ~redis_child() { stop(); }
  redis_child(const redis_child&) = delete;
  redis_child& operator=(const redis_child&) = delete;

  /// Starts the server and polls (bounded, 10 s) until it answers PING and
  /// INFO names this child's pid: false when the child exited (its port
  /// taken meanwhile: free_loopback_port() let it go before the child
  /// bound it) or another process answers on the port (another test's
  /// server, which this one must not talk to).
  [[nodiscard]] bool start() {
    auto port = std::to_string(port_);
    std::vector<std::string> args = {
        binary_,  "--port", port,           "--bind",     "127.0.0.1",
        "--save", "",       "--appendonly", "no",         "--daemonize",
        "no",     "--dir",  "/tmp",         "--loglevel", "warning"};
    std::vector<char*> argv;
    for (auto& a : args)
      argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
    int rc = posix_spawn(&pid_, binary_.c_str(), &actions, nullptr, argv.data(),
                         environ);
    posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) {
      pid_ = -1;
      return false;
    }
    auto deadline = std::chrono::steady_clock::now() + 10s;
    while (std::chrono::steady_clock::now() < deadline) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1; // exited: most likely its port was taken
        return false;
      }
      if (auto c = connect_direct(port_)) {
        auto r = command(c.get(), {"PING"});
        if (r && r->type == REDIS_REPLY_STATUS) {
          if (serves_this_child(c.get()))
            return true;
          stop();
          return false;
        }
      }
      std::this_thread::sleep_for(10ms); // the child is still starting
    }
    return false;
  }

  void stop() {
    if (pid_ <= 0)
      return;
    ::kill(pid_, SIGKILL);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
  }
  /// Whether the server on `c` is this child (INFO server's process_id).
  [[nodiscard]] bool serves_this_child(redisContext* c) const {
    auto info = command(c, {"INFO", "server"});
    if (!info || info->type != REDIS_REPLY_STRING)
      return false;
    const std::string text(info->str, info->len);
    const std::string field = "process_id:" + std::to_string(pid_) + "\r\n";
    return text.find(field) != std::string::npos;
  }

  void pause() { ::kill(pid_, SIGSTOP); }
  void resume() { ::kill(pid_, SIGCONT); }

  [[nodiscard]] std::uint16_t port() const noexcept { return port_; }
  [[nodiscard]] std::string url(std::string path = {}) const {
    return "redis://127.0.0.1:" + std::to_string(port_) + path;
  }

private:
  std::string binary_;
  std::uint16_t port_;
  pid_t pid_ = -1;
};

class RedisQueryStore : public ::testing::Test {
protected:
  void SetUp() override {
    auto bin = find_redis_server();
    if (!bin)
      GTEST_SKIP() << "redis-server not installed";
    // A port found free may be taken before the child binds it (tests
    // run in parallel): try another.
    bool started = false;
    for (int attempt = 0; attempt < 5 && !started; ++attempt) {
      server_ = std::make_unique<redis_child>(*bin, free_loopback_port());
      ASSERT_NE(server_->port(), 0);
      started = server_->start();
    }
    ASSERT_TRUE(started) << "redis-server did not answer PING as itself";
  }

  std::unique_ptr<redis_query_store> open(std::string path = {},
                                          std::string prefix = "kvfleet:q:") {
    redis_query_store_config c;
    c.url = server_->url(std::move(path));
    c.key_prefix = std::move(prefix);
    auto s = redis_query_store::open(c);
    EXPECT_TRUE(s.has_value()) << s.error().describe();
    return s ? std::move(*s) : nullptr;
  }

  /// Stores 64 MiB (zero bytes, then "x") under `key`, as another program
  /// may: far longer than any entry of the cache.
  void store_long_value(const std::string& key) {
    auto direct = connect_direct(server_->port());
    ASSERT_TRUE(direct);
    auto big = command(direct.get(),
                       {"SETRANGE", key, std::to_string((64 << 20) - 1), "x"});
    ASSERT_TRUE(big && big->type == REDIS_REPLY_INTEGER);
  }

  std::unique_ptr<redis_child> server_;
};

constexpr engine::nanos hour = std::chrono::hours{1};
constexpr engine::nanos t0{0};

TEST(RedisUrl, ParsesHostPortAndDb) {
  auto a = parse_redis_url("redis://127.0.0.1:6380/2");
  ASSERT_TRUE(a.has_value()) << a.error().describe();
  EXPECT_EQ(*a, (redis_endpoint{"127.0.0.1", 6380, 2, "", ""}));
  auto b = parse_redis_url("redis://cache.local");
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ(*b, (redis_endpoint{"cache.local", 6379, 0, "", ""}));
  auto c = parse_redis_url("redis://[::1]:7000/");
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(*c, (redis_endpoint{"::1", 7000, 0, "", ""}));
}

TEST(RedisUrl, RejectsBadUrlsSayingWhy) {
  struct bad {
    const char* url;
    const char* says;
  };
  using namespace std::string_literals;
  const auto with_nul = "redis://h\0x:6379"s;
  for (auto [url, says] : std::array<bad, 15>{{
           {"", "scheme"},
           {"http://h:1", "scheme"},
           {"rediss://h:1", "TLS"},
           {"redis://", "empty host"},
           {"redis://:6379", "empty host"},
           {"redis:///tmp/redis.sock", "Unix socket path is not supported"},
           {"redis://h:", "port"},
           {"redis://h:0", "port"},
           {"redis://h:65536", "port"},
           {"redis://h:12ab", "port"},
           {"redis://h:1/x", "database"},
           {"redis://::1:6379", "brackets"},
           {with_nul.c_str(), "control characters (NUL included)"},
           {"redis://h x:6379", "spaces and control characters"},
           {"redis://h:6379/0\n", "spaces and control characters"},
       }}) {
    auto r =
        parse_redis_url(url == with_nul.c_str() ? std::string_view(with_nul)
                                                : std::string_view(url));
    ASSERT_FALSE(r.has_value()) << url;
    EXPECT_EQ(r.error().code, errc::parse_error) << url;
    EXPECT_NE(r.error().message.find(says), std::string::npos)
        << url << ": " << r.error().message;
    EXPECT_EQ(r.error().message.find('\0'), std::string::npos);
  }
  EXPECT_NE(parse_redis_url(with_nul).error().message.find("'redis://h\\x00x"),
            std::string::npos)
      << parse_redis_url(with_nul).error().message;
  const std::pair<void (*)(redis_query_store_config&), const char*> bad[] = {
      {[](redis_query_store_config& c) { c.command_timeout = 0ms; },
       "command_timeout"},
      {[](redis_query_store_config& c) { c.connect_timeout = -1ms; },
       "connect_timeout"},
      {[](redis_query_store_config& c) { c.reconnect_after = -1ms; },
       "reconnect_after"},
      // Query strings would be raw Redis keys, other applications' too.
      {[](redis_query_store_config& c) { c.key_prefix.clear(); },
       "key_prefix must not be empty"},
      {[](redis_query_store_config& c) { c.max_value_bytes = 0; },
       "max_value_bytes"},
      {[](redis_query_store_config& c) {
         c.max_value_bytes =
             redis_query_store_config::max_value_bytes_limit + 1;
       },
       "max_value_bytes"},
      // Would wrap to -1 ms on the clock and never back off.
      {[](redis_query_store_config& c) {
         c.reconnect_after = std::chrono::milliseconds::max();
       },
       "reconnect_after"},
  };
  for (const auto& [edit, name] : bad) {
    redis_query_store_config c;
    c.url = "redis://h:1";
    edit(c);
    auto s = redis_query_store::open(c);
    ASSERT_FALSE(s.has_value()) << name;
    EXPECT_EQ(s.error().code, errc::invalid_argument);
    EXPECT_NE(s.error().message.find(name), std::string::npos)
        << s.error().message;
  }
  redis_query_store_config no_backoff;
  no_backoff.url = "redis://h:1";
  no_backoff.reconnect_after = 0ms;
  EXPECT_TRUE(redis_query_store::open(no_backoff).has_value());
}

TEST(RedisUrl, ParsesCredentials) {
  auto a = parse_redis_url("redis://:s3cret@cache.local:6380/1");
  ASSERT_TRUE(a.has_value()) << a.error().describe();
  EXPECT_EQ(*a, (redis_endpoint{"cache.local", 6380, 1, "", "s3cret"}));
  // Percent-escapes in both; the host's '@' is the last one.
  auto b = parse_redis_url("redis://alice:p%40ss%2Fw%3Ad@[::1]:7000");
  ASSERT_TRUE(b.has_value()) << b.error().describe();
  EXPECT_EQ(*b, (redis_endpoint{"::1", 7000, 0, "alice", "p@ss/w:d"}));
}

TEST(RedisUrl, BadCredentialsSayWhyWithoutShowingThem) {
  struct bad {
    const char* url;
    const char* says;
    const char* secret;
  };
  for (auto [url, says, secret] : std::array<bad, 15>{{
           {"redis://hunter2@h:1", "user:password", "hunter2"},
           // Unencoded '/', '?' or '#' in the password: the part after it
           // used to show (the '/' case) and the error blamed the port or
           // a query string.
           {"redis://alice:hunter/2@h:1", "percent-encode", "hunter"},
           {"redis://alice:hun?ter2@h:1", "percent-encode", "hun"},
           {"redis://:hun#ter2@h:1/3", "percent-encode", "hun"},
           {"redis://alice:@h:1", "empty password", "alice"},
           {"redis://alice:hun%zzter@h:1", "%-escape", "hun%zz"},
           {"redis://alice:hunter%4@h:1", "%-escape", "hunter"},
           {"redis://alice:hunter2@", "empty host", "hunter2"},
           {"rediss://alice:hunter2@h:1", "TLS", "hunter2"},
           // A mistyped scheme: no "://" to start the credentials from,
           // so the whole URL used to show.
           {"redis:/alice:hunter2@h:1", "scheme", "hunter2"},
           {"redis:alice:hunter2@h:1", "scheme", "hunter2"},
           {"redis//:hunter2@h:1", "scheme", "hunter2"},
           // A "://" that is no scheme's: in the password, after the '@'.
           {"redis:/alice:hunter2@h:1/0#http://x", "scheme", "hunter2"},
           {"redis:/alice:hun://ter2@h:1", "scheme", "hun"},
           {"redis:alice:hun://ter2@h:1", "scheme", "hun"},
       }}) {
    auto r = parse_redis_url(url);
    ASSERT_FALSE(r.has_value()) << url;
    EXPECT_EQ(r.error().code, errc::parse_error) << url;
    EXPECT_NE(r.error().message.find(says), std::string::npos)
        << url << ": " << r.error().message;
    EXPECT_EQ(r.error().message.find(secret), std::string::npos)
        << url << ": " << r.error().message;
    EXPECT_NE(r.error().message.find("***@"), std::string::npos)
        << r.error().message;
  }
}

TEST(RedisUrl, AURLWithoutAHostHidesWhatFollowsTheColon) {
  // No '@': a ':' followed by anything but a port may be a password whose
  // host was left out. Before, these showed whole. Only a well-formed
  // host:port[/db] stays shown (a password may be digits).
  struct bad {
    const char* url;
    const char* shown;
  };
  for (auto [url, shown] : std::array<bad, 11>{{
           {"redis://alice:hunter2", "'redis://alice:***'"},
           {"redis://:hunter2", "'redis://:***'"},
           {"redis://:hunter2/0", "'redis://:***'"},
           {"redis://alice:hun/hunter2", "'redis://alice:***'"},
           {"redis://[::1]:99999", "'redis://[::1]:***'"},
           {"redis://[alice:hunter2", "'redis://***'"},
           {"redis://alice:123/hunter2", "'redis://alice:***'"},
           {"redis://:20240101", "'redis://:***'"},
           {"redis://h:99999/0", "'redis://h:***'"},
           {"redis:/alice:hunter2", "'redis:***'"},
           {"redis://h:0", "'redis://h:***'"},
       }}) {
    auto r = parse_redis_url(url);
    ASSERT_FALSE(r.has_value()) << url;
    EXPECT_EQ(r.error().code, errc::parse_error) << url;
    EXPECT_NE(r.error().message.find(shown), std::string::npos)
        << url << ": " << r.error().message;
    EXPECT_EQ(r.error().message.find("hunter2"), std::string::npos)
        << url << ": " << r.error().message;
  }
}

TEST_F(RedisQueryStore, SetGetRoundTripUnderPrefix) {
  auto store = open();
  ASSERT_TRUE(store);
  kv_reply rep;
  rep.engine = 3;
  rep.matched_blocks = 7;
  rep.computed_tokens = 112;
  auto value = encode_reply(rep);
  ASSERT_TRUE(store->set("what is kv", value, hour, t0));
  auto got = store->get("what is kv", t0);
  ASSERT_TRUE(got.has_value()) << got.error().describe();
  ASSERT_TRUE(got->has_value());
  kv_reply back;
  ASSERT_TRUE(decode_reply(**got, back));
  EXPECT_EQ(back, rep);

  std::string binary("a\0b\xff", 4); // values are byte strings
  ASSERT_TRUE(store->set("bin", binary, hour, t0));
  EXPECT_EQ(store->get("bin", t0)->value_or(""), binary);

  auto direct = connect_direct(server_->port());
  ASSERT_TRUE(direct);
  auto r = command(direct.get(), {"GET", "kvfleet:q:what is kv"});
  ASSERT_TRUE(r && r->type == REDIS_REPLY_STRING);
  EXPECT_EQ(std::string(r->str, r->len), value);

  auto other = open({}, "other:");
  ASSERT_TRUE(other);
  EXPECT_FALSE(other->get("what is kv", t0)->has_value());
  EXPECT_EQ(other->redis_key("k"), "other:k");
}

TEST_F(RedisQueryStore, AKeyAsLongAsAWholePromptIsStoredUnderADigest) {
  // A 4 MiB query key (a whole prompt): sent as itself three times a
  // request, it took longer than the 50 ms command timeout on a loaded
  // machine, and the timeout dropped the connection and failed every key
  // for a second. Now its Redis key is the prefix and 257 bytes; keys
  // differing in their last byte stay apart, and keys up to 256 bytes are
  // kept as they are.
  auto store = open();
  ASSERT_TRUE(store);
  std::string a(std::size_t{4} << 20, 'p');
  std::string b = a;
  b.back() = 'q';
  ASSERT_TRUE(store->set("small", "s", hour, t0));
  ASSERT_TRUE(store->set(a, "for a", hour, t0));
  EXPECT_EQ(store->get(a, t0)->value_or(""), "for a");
  EXPECT_FALSE(store->get(b, t0)->has_value());
  EXPECT_EQ(store->get("small", t0)->value_or(""), "s");
  const std::string ra = store->redis_key(a);
  EXPECT_EQ(ra.size(), std::string("kvfleet:q:").size() + 257);
  EXPECT_NE(ra, store->redis_key(b));
  const std::string edge(256, 'k');
  EXPECT_EQ(store->redis_key(edge), "kvfleet:q:" + edge);
  auto direct = connect_direct(server_->port());
  ASSERT_TRUE(direct);
  auto r = command(direct.get(), {"GET", ra});
  ASSERT_TRUE(r && r->type == REDIS_REPLY_STRING);
  EXPECT_EQ(std::string(r->str, r->len), "for a");
}

TEST_F(RedisQueryStore, MissingKeyIsNullopt) {
  auto store = open();
  ASSERT_TRUE(store);
  auto got = store->get("never stored", t0);
  ASSERT_TRUE(got.has_value()) << got.error().describe();
  EXPECT_FALSE(got->has_value());
}

TEST_F(RedisQueryStore, SetsTtlInMillisecondsAndEntriesExpire) {
  auto store = open();
  ASSERT_TRUE(store);
  auto direct = connect_direct(server_->port());
  ASSERT_TRUE(direct);
  ASSERT_TRUE(store->set("k", "v", hour, t0));
  auto pttl = command(direct.get(), {"PTTL", "kvfleet:q:k"});
  ASSERT_TRUE(pttl && pttl->type == REDIS_REPLY_INTEGER);
  EXPECT_GT(pttl->integer, 3'590'000);
  EXPECT_LE(pttl->integer, 3'600'000);
  // 1.5 ms rounds up to 2 ms, never down to 0 (which Redis rejects).
  ASSERT_TRUE(store->set("short", "v", 1500us, t0));
  auto gone = false;
  auto deadline = std::chrono::steady_clock::now() + 5s;
  while (!gone && std::chrono::steady_clock::now() < deadline) {
    auto got = store->get("short", t0);
    ASSERT_TRUE(got.has_value()) << got.error().describe();
    gone = !got->has_value();
    if (!gone)
      std::this_thread::sleep_for(1ms); // Redis's clock, not ours
  }
  EXPECT_TRUE(gone);
  auto bad = store->set("k", "v", engine::nanos{0}, t0);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, errc::invalid_argument);
}

TEST_F(RedisQueryStore, SelectsTheUrlsDatabase) {
  auto store = open("/3");
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->set("k", "in db 3", hour, t0));
  auto direct = connect_direct(server_->port());
  ASSERT_TRUE(direct);
  auto in0 = command(direct.get(), {"EXISTS", "kvfleet:q:k"});
  ASSERT_TRUE(in0);
  EXPECT_EQ(in0->integer, 0);
  ASSERT_TRUE(command(direct.get(), {"SELECT", "3"}));
  auto in3 = command(direct.get(), {"GET", "kvfleet:q:k"});
  ASSERT_TRUE(in3 && in3->type == REDIS_REPLY_STRING);
  EXPECT_EQ(std::string(in3->str, in3->len), "in db 3");
}

TEST_F(RedisQueryStore, ErrorReplyIsAnErrorValueNamingIt) {
  auto store = open();
  ASSERT_TRUE(store);
  auto direct = connect_direct(server_->port());
  ASSERT_TRUE(direct);
  ASSERT_TRUE(command(direct.get(), {"LPUSH", "kvfleet:q:list", "x"}));
  auto got = store->get("list", t0);
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().code, errc::backend_error);
  EXPECT_NE(got.error().message.find("WRONGTYPE"), std::string::npos)
      << got.error().message;
  EXPECT_TRUE(store->connected()); // a reply error keeps the connection
  EXPECT_TRUE(store->set("fine", "v", hour, t0));
}

TEST_F(RedisQueryStore, ValuesUpToMaxValueBytesRoundTripLongerAreRefused) {
  auto store = open();
  ASSERT_TRUE(store);
  const std::string longest(1024, 'v'); // max_value_bytes
  ASSERT_TRUE(store->set("longest", longest, hour, t0));
  EXPECT_EQ(store->get("longest", t0)->value_or(""), longest);
  // An empty value is a value, not a miss (GETRANGE alone reads both as "").
  ASSERT_TRUE(store->set("empty", "", hour, t0));
  auto empty = store->get("empty", t0);
  ASSERT_TRUE(empty.has_value()) << empty.error().describe();
  ASSERT_TRUE(empty->has_value());
  EXPECT_EQ(**empty, "");
  auto too_long = store->set("k", longest + "v", hour, t0);
  ASSERT_FALSE(too_long);
  EXPECT_EQ(too_long.error().code, errc::value_too_large);
  EXPECT_NE(too_long.error().message.find("max_value_bytes"), std::string::npos)
      << too_long.error().message;
}

TEST_F(RedisQueryStore, AValueTooLongForTheStoreIsAnotherProgramsNoFailure) {
  // 64 MiB under a cache key, stored by another program (SETRANGE pads with
  // zero bytes). get reads at most max_value_bytes + 1 bytes of it and
  // fails with an error value, keeping the connection: no backoff, so the
  // set that replaces it and every other key work at once. (A GET of all of
  // it timed out, a connection-level failure: for 1 s every call failed,
  // and a key asked for every second kept the whole cache off.)
  store_long_value("kvfleet:q:big");
  auto store = open();
  ASSERT_TRUE(store);
  auto got = store->get("big", t0);
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().code, errc::backend_error);
  EXPECT_NE(got.error().message.find("longer than 1024 bytes"),
            std::string::npos)
      << got.error().message;
  EXPECT_TRUE(store->connected());
  auto other = store->get("other", t0);
  ASSERT_TRUE(other.has_value()) << other.error().describe();
  EXPECT_FALSE(other->has_value());
  ASSERT_TRUE(store->set("big", "v1 0 1 1 16 16", hour, t0));
  EXPECT_EQ(store->get("big", t0)->value_or(""), "v1 0 1 1 16 16");
  EXPECT_EQ(store->connects(), 1U);
}

TEST_F(RedisQueryStore, AuthenticatesWithThePasswordOrAsAnAclUser) {
  auto direct = connect_direct(server_->port());
  ASSERT_TRUE(direct);
  auto acl = command(direct.get(), {"ACL", "SETUSER", "alice", "on",
                                    ">al!ce pw", "~kvfleet:*", "+@all"});
  ASSERT_TRUE(acl && acl->type == REDIS_REPLY_STATUS);
  auto pass = command(direct.get(), {"CONFIG", "SET", "requirepass", "s3cret"});
  ASSERT_TRUE(pass && pass->type == REDIS_REPLY_STATUS);
  const auto host = "127.0.0.1:" + std::to_string(server_->port());
  auto open_as = [&](const std::string& credentials) {
    redis_query_store_config c;
    c.url = "redis://" + credentials + host;
    auto s = redis_query_store::open(c);
    EXPECT_TRUE(s.has_value()) << s.error().describe();
    return s ? std::move(*s) : nullptr;
  };
  // Without credentials the server refuses every command.
  auto anonymous = open_as("");
  ASSERT_TRUE(anonymous);
  auto refused = anonymous->get("k", t0);
  ASSERT_FALSE(refused.has_value());
  EXPECT_NE(refused.error().message.find("NOAUTH"), std::string::npos)
      << refused.error().message;
  // The default user's password, then an ACL user (percent-encoded).
  auto with_password = open_as(":s3cret@");
  ASSERT_TRUE(with_password);
  ASSERT_TRUE(with_password->set("k", "v", hour, t0));
  EXPECT_EQ(with_password->get("k", t0)->value_or(""), "v");
  auto alice = open_as("alice:al%21ce%20pw@");
  ASSERT_TRUE(alice);
  auto got = alice->get("k", t0);
  ASSERT_TRUE(got.has_value()) << got.error().describe();
  EXPECT_EQ(got->value_or(""), "v");
  // A wrong password: an error value naming AUTH, without the password.
  auto wrong = open_as("alice:n0tthis@");
  ASSERT_TRUE(wrong);
  auto denied = wrong->get("k", t0);
  ASSERT_FALSE(denied.has_value());
  EXPECT_EQ(denied.error().code, errc::backend_error);
  EXPECT_NE(denied.error().message.find("AUTH as 'alice' failed"),
            std::string::npos)
      << denied.error().message;
  EXPECT_NE(denied.error().message.find("WRONGPASS"), std::string::npos)
      << denied.error().message;
  EXPECT_EQ(denied.error().message.find("n0tthis"), std::string::npos);
  EXPECT_FALSE(wrong->connected());
}

TEST_F(RedisQueryStore, AnAclUserWithoutTheCommandsItNeedsIsToldWhich) {
  // The store reads with GETRANGE and EXISTS, not GET: a user allowed only
  // +get +set gets NOPERM on every read, and the message says which
  // commands the user needs. EXISTS alone refused is an error too (every
  // miss would read as an empty value).
  auto direct = connect_direct(server_->port());
  ASSERT_TRUE(direct);
  for (const char* allowed : {"+get", "+getrange"}) {
    auto acl = command(direct.get(), {"ACL", "SETUSER", "bob", "reset", "on",
                                      ">pw", "~kvfleet:*", "+set", allowed});
    ASSERT_TRUE(acl && acl->type == REDIS_REPLY_STATUS) << allowed;
    redis_query_store_config c;
    c.url = "redis://bob:pw@127.0.0.1:" + std::to_string(server_->port());
    auto store = redis_query_store::open(c);
    ASSERT_TRUE(store.has_value()) << store.error().describe();
    ASSERT_TRUE((*store)->set("k", "v", hour, t0));
    auto got = (*store)->get("k", t0);
    ASSERT_FALSE(got.has_value()) << allowed;
    EXPECT_NE(got.error().message.find("NOPERM"), std::string::npos)
        << got.error().message;
    EXPECT_NE(got.error().message.find("+getrange +exists +set"),
              std::string::npos)
        << got.error().message;
    EXPECT_TRUE((*store)->connected()); // no backoff: a reply, not a failure
  }
}

TEST_F(RedisQueryStore, AHostNameIsResolvedAndConnectedWithinTheTimeout) {
  // localhost resolves locally (/etc/hosts); the store hands hiredis its
  // numeric address and names the host in messages.
  redis_query_store_config c;
  c.url = "redis://localhost:" + std::to_string(server_->port());
  auto store = redis_query_store::open(c);
  ASSERT_TRUE(store) << store.error().describe();
  ASSERT_TRUE((*store)->set("k", "by name", hour, t0));
  EXPECT_EQ((*store)->get("k", t0)->value_or(""), "by name");
  EXPECT_EQ((*store)->connects(), 1U);
  server_->stop();
  auto down = (*store)->get("k", t0);
  ASSERT_FALSE(down);
  EXPECT_NE(down.error().message.find("Redis localhost:"), std::string::npos)
      << down.error().message;
}

TEST(RedisQueryStoreResolve, AnUnresolvableHostFailsNamingIt) {
  // .invalid never resolves (RFC 6761): the connect fails with a message
  // that names the host and says it did not resolve (at once, or, with a
  // slow DNS, after connect_timeout), then backs off like a refused one.
  redis_query_store_config c;
  c.url = "redis://nosuch.invalid:6379";
  auto store = redis_query_store::open(c);
  ASSERT_TRUE(store) << store.error().describe();
  auto got = (*store)->get("k", t0);
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error().code, errc::backend_error);
  EXPECT_NE(got.error().message.find("cannot resolve 'nosuch.invalid'"),
            std::string::npos)
      << got.error().message;
  auto soon = (*store)->get("k", t0 + 1ms);
  ASSERT_FALSE(soon);
  EXPECT_EQ((*store)->connects(), 1U) << soon.error().message;
}

TEST_F(RedisQueryStore, ServerDownIsAnErrorValueThenReconnects) {
  auto store = open();
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->set("k", "v", hour, t0));
  server_->stop();
  auto got = store->get("k", t0);
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().code, errc::backend_error);
  EXPECT_NE(got.error().message.find("Redis 127.0.0.1:"), std::string::npos)
      << got.error().message;
  EXPECT_FALSE(store->connected());
  // Past the reconnect backoff (1 s of the caller's clock): connect refused.
  auto put = store->set("k", "v", hour, t0 + 1s);
  ASSERT_FALSE(put);
  EXPECT_EQ(put.error().code, errc::backend_error);
  EXPECT_NE(put.error().message.find("connect"), std::string::npos)
      << put.error().message;

  ASSERT_TRUE(server_->start()); // same port, empty (no persistence)
  auto after = store->get("k", t0 + 2s);
  ASSERT_TRUE(after.has_value()) << after.error().describe();
  EXPECT_FALSE(after->has_value());
  ASSERT_TRUE(store->set("k", "again", hour, t0 + 2s));
  EXPECT_EQ(store->get("k", t0 + 2s)->value_or(""), "again");
}

TEST_F(RedisQueryStore, ServerClosingAnIdleConnectionCostsNoCall) {
  // A server that closes a working connection (its idle `timeout`, CLIENT
  // KILL, a restart) is not down: the call that finds the connection
  // closed connects again at once and retries, and succeeds (before, it
  // failed: a get was a store error and a recomputation, a set lost its
  // entry).
  auto store = open();
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->set("k", "v", hour, t0));
  ASSERT_EQ(store->connects(), 1U);
  auto admin = connect_direct(server_->port());
  ASSERT_TRUE(admin);
  auto killed = command(admin.get(),
                        {"CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"});
  ASSERT_TRUE(killed);
  ASSERT_EQ(killed->type, REDIS_REPLY_INTEGER);
  ASSERT_EQ(killed->integer, 1);

  auto got = store->get("k", t0);
  ASSERT_TRUE(got.has_value()) << got.error().describe();
  EXPECT_EQ(got->value_or(""), "v");
  EXPECT_TRUE(store->connected());
  EXPECT_EQ(store->connects(), 2U);

  // The same for a set.
  killed = command(admin.get(),
                   {"CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"});
  ASSERT_TRUE(killed);
  ASSERT_TRUE(store->set("k", "w", hour, t0));
  EXPECT_EQ(store->get("k", t0)->value_or(""), "w");
  EXPECT_EQ(store->connects(), 3U);
}

TEST_F(RedisQueryStore, StalledServerTimesOutAndRecovers) {
  auto store = open(); // command timeout 50 ms
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->set("k", "v", hour, t0));
  server_->pause(); // the kernel still accepts; Redis never answers
  auto got = store->get("k", t0);
  server_->resume();
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().code, errc::backend_error);
  EXPECT_FALSE(store->connected());
  auto again = store->get("k", t0 + 1s); // after the reconnect backoff
  ASSERT_TRUE(again.has_value()) << again.error().describe();
  EXPECT_EQ(again->value_or(""), "v");
}

TEST_F(RedisQueryStore, AFailedRedisIsNotTriedAgainUntilReconnectAfter) {
  // A stalled server costs a call its 50 ms command timeout. After one such
  // failure, calls within reconnect_after (1 s) fail at once without
  // touching the network (else a Redis outage would cost every query-cache
  // request that timeout, one after the other on the cache's thread); the
  // first call after it connects again.
  auto store = open();
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->set("k", "v", hour, t0));
  server_->pause();
  auto timed_out = store->get("k", t0);
  ASSERT_FALSE(timed_out.has_value());
  for (int i = 1; i <= 5; ++i) {
    const auto at = t0 + 100ms * i;
    auto got = store->get("k", at);
    ASSERT_FALSE(got.has_value()) << i;
    EXPECT_EQ(got.error().code, errc::backend_error);
    EXPECT_NE(got.error().message.find("next attempt in"), std::string::npos)
        << got.error().message;
    EXPECT_FALSE(store->set("k", "w", hour, at));
  }
  server_->resume();
  EXPECT_FALSE(store->get("k", t0 + 999ms).has_value()); // still waiting
  auto again = store->get("k", t0 + 1s);
  ASSERT_TRUE(again.has_value()) << again.error().describe();
  EXPECT_EQ(again->value_or(""), "v");
}

/// A server on a loopback port that reads what each connection sends, then
/// answers with `reply`, one byte every `gap`, and closes it. With no reply
/// it closes the connection unanswered, as a proxy whose backend is down
/// does (a redis-server over maxclients or in protected mode sends an error
/// first; whether the client then reads the error or the close depends on
/// timing; reading first makes the close a clean FIN, so the client sees
/// EOF, not a reset). With a gap it is alive but slow (or hostile): every
/// read of the client gets a byte in time, the whole reply takes
/// reply.size() x gap. It stops at once when the client goes away or the
/// server is destroyed.
class scripted_server {
public:
  explicit scripted_server(std::string reply = {},
                           std::chrono::milliseconds gap = {})
      : gap_(gap), reply_(std::move(reply)) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (fd_ < 0 ||
        ::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        ::listen(fd_, 8) != 0 ||
        ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0)
      return;
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { serve(); });
  }
  ~scripted_server() {
    if (thread_.joinable()) {
      {
        std::lock_guard lock(mutex_);
        stopping_ = true;
      }
      wake_.notify_all();
      (void)connect_direct(port_); // wakes the accept()
      thread_.join();
    }
    if (fd_ >= 0)
      ::close(fd_);
  }
  scripted_server(const scripted_server&) = delete;
  scripted_server& operator=(const scripted_server&) = delete;

  [[nodiscard]] std::uint16_t port() const noexcept { return port_; }

private:
  void serve() {
    while (true) {
      const int conn = ::accept(fd_, nullptr, nullptr);
      if (conn < 0)
        return;
      std::array<char, 4096> buf{};
      (void)::recv(conn, buf.data(), buf.size(), 0);
      for (const char byte : reply_) {
        std::unique_lock lock(mutex_);
        // The trickle itself: the gap is what this server is for.
        if (wake_.wait_for(lock, gap_, [this] { return stopping_; }))
          break;
        lock.unlock();
        if (::send(conn, &byte, 1, MSG_NOSIGNAL) != 1)
          break; // the client gave up
      }
      ::close(conn);
      std::lock_guard lock(mutex_);
      if (stopping_)
        return;
    }
  }

  std::chrono::milliseconds gap_;
  std::string reply_;
  int fd_ = -1;
  std::uint16_t port_ = 0;
  std::mutex mutex_; ///< guards stopping_, which wake_ waits on
  std::condition_variable wake_;
  bool stopping_ = false;
  std::thread thread_;
};

TEST(RedisQueryStoreClosed, AServerClosingNewConnectionsUnansweredIsBackedOff) {
  // The connection is closed before it answered any command: that is no
  // working server that dropped an idle connection, so calls within
  // reconnect_after (1 s) fail at once instead of each connecting again.
  // (Before, every call connected and failed: six connects here.)
  scripted_server server; // closes each connection unanswered
  ASSERT_NE(server.port(), 0);
  redis_query_store_config c;
  c.url = "redis://127.0.0.1:" + std::to_string(server.port());
  auto store = redis_query_store::open(c);
  ASSERT_TRUE(store.has_value()) << store.error().describe();
  auto first = (*store)->get("k", t0);
  ASSERT_FALSE(first.has_value());
  EXPECT_EQ(first.error().code, errc::backend_error);
  EXPECT_NE(first.error().message.find("before answering any command"),
            std::string::npos)
      << first.error().message;
  for (int i = 1; i <= 5; ++i) {
    const auto at = t0 + 100ms * i;
    auto got = (*store)->get("k", at);
    ASSERT_FALSE(got.has_value()) << i;
    EXPECT_NE(got.error().message.find("next attempt in"), std::string::npos)
        << got.error().message;
  }
  EXPECT_EQ((*store)->connects(), 1U);
  EXPECT_FALSE((*store)->set("k", "v", hour, t0 + 1s)); // tries again
  EXPECT_EQ((*store)->connects(), 2U);
}

TEST(RedisQueryStoreClosed, AnErrorReplyBeforeTheCloseIsQuoted) {
  // Redis over maxclients answers the first command with an error, then
  // closes: a get's pipeline reads that error for GETRANGE and the close
  // for EXISTS. The failure quotes the error. (Before, it said only that
  // the server closed the connection before answering, and an operator
  // looked at the network.)
  scripted_server server("-ERR max number of clients reached\r\n");
  ASSERT_NE(server.port(), 0);
  redis_query_store_config c;
  c.url = "redis://127.0.0.1:" + std::to_string(server.port());
  auto store = redis_query_store::open(c);
  ASSERT_TRUE(store.has_value()) << store.error().describe();
  auto got = (*store)->get("k", t0);
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().code, errc::backend_error);
  EXPECT_NE(got.error().message.find(
                "(Redis said: ERR max number of clients reached)"),
            std::string::npos)
      << got.error().message;
}

TEST(RedisQueryStoreClosed, ARetryAfterAReplyCutOffReadsItsOwnReplies) {
  // The first connection answers a get, then only the GETRANGE reply of
  // the next get's pipeline, and closes. The get retries on a new
  // connection, which answers "missing" to every get and OK to a set: the
  // retry reads both of its own replies (before, it kept the first
  // attempt's GETRANGE reply, answered "v", and left one reply unread on
  // the new connection, so every later command read the one before and
  // failed).
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(::listen(fd, 4), 0);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const auto read_some = [](int c) {
    std::array<char, 4096> buf{};
    const auto n = ::recv(c, buf.data(), buf.size(), 0);
    return n > 0 ? std::string(buf.data(), static_cast<std::size_t>(n))
                 : std::string{};
  };
  const auto send_all = [](int c, const std::string& r) {
    (void)::send(c, r.data(), r.size(), MSG_NOSIGNAL);
  };
  std::thread server([&] {
    const int first = ::accept(fd, nullptr, nullptr);
    if (first < 0)
      return;
    (void)read_some(first);
    send_all(first, "$1\r\nv\r\n:1\r\n");
    (void)read_some(first);
    send_all(first, "$1\r\nv\r\n"); // EXISTS's reply never comes
    ::shutdown(first, SHUT_RDWR);
    ::close(first);
    const int second = ::accept(fd, nullptr, nullptr);
    if (second < 0)
      return;
    for (int i = 0; i < 3; ++i) {
      const auto got = read_some(second);
      if (got.empty())
        break;
      send_all(second, got.find("SET") != std::string::npos
                           ? "+OK\r\n"
                           : "$0\r\n\r\n:0\r\n");
    }
    ::close(second);
  });
  // A failed assertion below must not leave the server waiting: shutting
  // the listening socket ends its accept().
  struct joined {
    int fd;
    std::thread& t;
    ~joined() {
      ::shutdown(fd, SHUT_RDWR);
      t.join();
      ::close(fd);
    }
  } join_at_end{fd, server};
  redis_query_store_config c;
  c.url = "redis://127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
  auto store = redis_query_store::open(c);
  ASSERT_TRUE(store.has_value()) << store.error().describe();
  auto first = (*store)->get("k", t0);
  ASSERT_TRUE(first.has_value()) << first.error().describe();
  EXPECT_EQ(first->value_or(""), "v");
  auto retried = (*store)->get("k", t0);
  ASSERT_TRUE(retried.has_value()) << retried.error().describe();
  EXPECT_FALSE(retried->has_value()) << **retried;
  auto next = (*store)->get("k2", t0);
  ASSERT_TRUE(next.has_value()) << next.error().describe();
  EXPECT_FALSE(next->has_value());
  auto set = (*store)->set("k3", "x", hour, t0);
  EXPECT_TRUE(set.has_value()) << set.error().describe();
  EXPECT_EQ((*store)->connects(), 2U);
  store->reset(); // closes the second connection: the server's loop ends
}

TEST(RedisQueryStoreTrickle, AReplyTrickledInPastTheCommandTimeoutFails) {
  // One byte every 20 ms: each read gets a byte within the 50 ms command
  // timeout, the whole reply would take over 4 s. The timeout bounds the
  // whole command, so the call fails after it, drops the connection and
  // backs off like a stalled server. (It used to bound each read only: the
  // call waited for the last byte, and a server trickling without end held
  // the cache's thread, and the process's exit, for ever.)
  scripted_server server("$200\r\n" + std::string(200, 'x') + "\r\n", 20ms);
  ASSERT_NE(server.port(), 0);
  redis_query_store_config c;
  c.url = "redis://127.0.0.1:" + std::to_string(server.port());
  auto store = redis_query_store::open(c);
  ASSERT_TRUE(store.has_value()) << store.error().describe();
  const auto start = std::chrono::steady_clock::now();
  auto got = (*store)->get("k", t0);
  const auto took = std::chrono::steady_clock::now() - start;
  ASSERT_FALSE(got.has_value()) << got->value_or("(nullopt)").size();
  EXPECT_EQ(got.error().code, errc::backend_error);
  EXPECT_NE(got.error().message.find("no complete reply within 50 ms"),
            std::string::npos)
      << got.error().message;
  EXPECT_LT(took, 2s); // a bound on hanging, not a timing bar
  EXPECT_FALSE((*store)->connected());
  auto soon = (*store)->get("k", t0 + 1ms);
  ASSERT_FALSE(soon.has_value());
  EXPECT_NE(soon.error().message.find("next attempt in"), std::string::npos)
      << soon.error().message;
  EXPECT_EQ((*store)->connects(), 1U);
}

node_config redis_node(std::string url) {
  node_config c;
  c.engines = 1;
  c.engine.ns.model = "redis-node-test";
  c.engine.ns.layers = 1;
  c.engine.ns.kv_heads = 1;
  c.engine.ns.head_dim = 64;
  c.engine.ns.block_tokens = 16;
  c.engine.store.capacity_bytes = 1u << 20;
  c.engine.store.slab_bytes = 64u << 10;
  c.cache.redis_url = std::move(url);
  return c;
}

/// The Redis key of query `q` of a redis_node().
std::string node_key(const std::string& q) {
  return "kvfleet:q:" + query_key_scope(redis_node("").engine.ns) + q;
}

kv_request query(std::uint64_t id, std::string q) {
  kv_request r;
  r.id = id;
  r.query = std::move(q);
  r.keys = {engine::block_key{5, 1}, engine::block_key{5, 2}};
  r.input_tokens = 32;
  return r;
}

/// The query cache's stats; nullopt when it does not answer in 5 s.
std::optional<query_cache_stats> cache_stats(caf::actor_system& sys, node& n) {
  caf::scoped_actor self{sys};
  std::optional<query_cache_stats> st;
  self->request(n.query_cache(), 5s, stats_atom::value)
      .receive([&](query_cache_stats& s) { st = s; }, [](caf::error&) {});
  return st;
}

/// Query "q" twice through `n`: the first a miss, the second a hit.
std::pair<std::optional<kv_reply>, std::optional<kv_reply>>
miss_then_hit(node& n) {
  auto first = n.process_request(query(1, "q"));
  EXPECT_TRUE(first.has_value()) << first.error().describe();
  auto second = n.process_request(query(2, "q"));
  EXPECT_TRUE(second.has_value()) << second.error().describe();
  if (!first || !second)
    return {};
  EXPECT_FALSE(first->from_query_cache);
  EXPECT_TRUE(second->from_query_cache);
  return {*first, *second};
}

TEST_F(RedisQueryStore, ANodeReplacesAnotherProgramsLongValueWithItsEntry) {
  // The cache counts the long value like any value it cannot read, computes
  // the request and stores its reply over it: the next request is a hit.
  store_long_value(node_key("q"));
  caf::actor_system_config cfg;
  node::configure(cfg, 2);
  caf::actor_system sys{cfg};
  auto n = node::start(sys, redis_node(server_->url()));
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  const auto [first, second] = miss_then_hit(**n);
  ASSERT_TRUE(first && second);
  const auto st = cache_stats(sys, **n);
  ASSERT_TRUE(st.has_value());
  EXPECT_EQ(st->hits, 1U);
  EXPECT_EQ(st->store_errors, 1U); // the long value's get
}

TEST_F(RedisQueryStore, NodeCachesQueryResultsInRedis) {
  caf::actor_system_config cfg;
  node::configure(cfg, 2);
  caf::actor_system sys{cfg};
  auto bad = node::start(sys, redis_node("redis://nowhere:0"));
  ASSERT_FALSE(bad.has_value());
  EXPECT_EQ(bad.error().code, errc::parse_error);

  auto n = node::start(sys, redis_node(server_->url()));
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  const auto [first, second] = miss_then_hit(**n);
  ASSERT_TRUE(first && second);
  EXPECT_EQ(second->id, 2U);
  EXPECT_EQ(second->computed_blocks, first->computed_blocks);
  auto direct = connect_direct(server_->port());
  ASSERT_TRUE(direct);
  auto pttl = command(direct.get(), {"PTTL", node_key("q")});
  ASSERT_TRUE(pttl && pttl->type == REDIS_REPLY_INTEGER);
  EXPECT_GT(pttl->integer, 3'590'000); // the default TTL, 3600 s

  // Redis down: requests are still answered (computed), errors counted.
  server_->stop();
  auto third = (*n)->process_request(query(3, "q"));
  ASSERT_TRUE(third.has_value()) << third.error().describe();
  EXPECT_FALSE(third->from_query_cache);
  const auto st = cache_stats(sys, **n);
  ASSERT_TRUE(st.has_value());
  EXPECT_EQ(st->hits, 1U);
  EXPECT_EQ(st->misses, 2U);
  EXPECT_EQ(st->store_errors, 2U); // the get and the set of request 3
}

TEST_F(RedisQueryStore, NodesShareQueryResultsOnlyWithinTheirModel) {
  // One Redis, three nodes: two of one model, one of another. The same
  // query string is another prompt under another model: its result must
  // not answer it. (Before, the key was the prefix and the query alone, and
  // the other model's node got the first one's reply as a hit.)
  caf::actor_system_config cfg;
  node::configure(cfg, 2);
  caf::actor_system sys{cfg};
  auto a = node::start(sys, redis_node(server_->url()));
  auto same = node::start(sys, redis_node(server_->url()));
  auto other_cfg = redis_node(server_->url());
  other_cfg.engine.ns.model = "another-model";
  auto other = node::start(sys, other_cfg);
  ASSERT_TRUE(a && same && other);
  auto first = (*a)->process_request(query(1, "q"));
  ASSERT_TRUE(first.has_value()) << first.error().describe();
  EXPECT_FALSE(first->from_query_cache);
  auto elsewhere = (*other)->process_request(query(2, "q"));
  ASSERT_TRUE(elsewhere.has_value()) << elsewhere.error().describe();
  EXPECT_FALSE(elsewhere->from_query_cache);
  auto shared = (*same)->process_request(query(3, "q"));
  ASSERT_TRUE(shared.has_value()) << shared.error().describe();
  EXPECT_TRUE(shared->from_query_cache);
  EXPECT_NE(query_key_scope(redis_node("").engine.ns),
            query_key_scope(other_cfg.engine.ns));
  EXPECT_EQ(query_key_scope(redis_node("").engine.ns).size(), 33U);
}

} // namespace
} // namespace kvfleet::actors

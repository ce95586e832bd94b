// The TCP block transport end to end over loopback: two threads, bounded
// by short timeouts.
#include "cuda/tcp_transport.hpp"

#include "cuda/internal/tcp_socket.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <array>
#include <condition_variable>
#include <cstring>
#include <future>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

namespace kvfleet::cuda {
namespace {

using namespace std::chrono_literals;

std::vector<std::byte> pattern(std::size_t n, unsigned seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i)
    v[i] = static_cast<std::byte>((i * 131 + seed) & 0xffU);
  return v;
}

/// A frame header as a raw peer sends it (wire version 4): blocks of
/// `sizes` bytes, whose digest is that of `claimed` (by default `sizes`,
/// as an honest peer's), expecting blocks of `expects` back (none by
/// default: count 0, digest 0).
std::vector<unsigned char>
frame_head(const std::vector<std::uint64_t>& sizes,
           std::optional<std::vector<std::uint64_t>> claimed = {},
           const std::vector<std::uint64_t>& expects = {}) {
  const auto digest = [](const std::vector<std::uint64_t>& of) {
    std::vector<recv_block> as_blocks;
    for (const std::uint64_t n : of)
      as_blocks.push_back({nullptr, n});
    return internal::sizes_digest(std::span<const recv_block>(as_blocks));
  };
  std::vector<unsigned char> h = {'K', 'V', 'F', '4'};
  const auto put = [&h](std::uint64_t v, int bytes) {
    for (int i = 0; i < bytes; ++i)
      h.push_back(static_cast<unsigned char>((v >> (8 * i)) & 0xffU));
  };
  put(sizes.size(), 4);
  put(digest(claimed.value_or(sizes)), 8);
  put(expects.size(), 4);
  put(digest(expects), 8);
  for (const std::uint64_t n : sizes)
    put(n, 8);
  return h;
}

/// Expects `r` to have failed with errc::wrong_value_size saying `says`.
void expect_mismatch(const result<void>& r, std::string_view says) {
  ASSERT_FALSE(r) << "expected a mismatch saying: " << says;
  EXPECT_EQ(r.error().code, errc::wrong_value_size) << r.error().describe();
  EXPECT_NE(r.error().message.find(says), std::string::npos)
      << r.error().message;
}

struct pair_of_ends {
  std::unique_ptr<tcp_transport> client;
  std::unique_ptr<tcp_transport> server;
};

pair_of_ends connect_pair() {
  auto listener = tcp_listener::listen("127.0.0.1", 0);
  EXPECT_TRUE(listener) << listener.error().describe();
  auto accepted =
      std::async(std::launch::async, [&] { return listener->accept(5s, 5s); });
  auto client = tcp_transport::connect("127.0.0.1", listener->port(), 5s);
  auto server = accepted.get();
  EXPECT_TRUE(client) << client.error().describe();
  EXPECT_TRUE(server) << server.error().describe();
  return {std::move(*client), std::move(*server)};
}

TEST(tcp_transport_test, a_batch_of_blocks_arrives_intact) {
  auto ends = connect_pair();
  ASSERT_TRUE(ends.client && ends.server);
  const std::vector<std::size_t> sizes{32768, 1, 0, 262144, 4096};
  std::vector<std::vector<std::byte>> src;
  std::vector<send_block> out;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    src.push_back(pattern(sizes[i], static_cast<unsigned>(i)));
    out.push_back({src.back().data(), sizes[i]});
  }
  std::vector<std::vector<std::byte>> dst;
  std::vector<recv_block> in;
  for (std::size_t n : sizes)
    dst.emplace_back(n);
  for (std::size_t i = 0; i < sizes.size(); ++i)
    in.push_back({dst[i].data(), sizes[i]});

  auto sent =
      std::async(std::launch::async, [&] { return ends.client->send(0, out); });
  auto got = ends.server->recv(0, in);
  ASSERT_TRUE(got) << got.error().describe();
  ASSERT_TRUE(sent.get());
  EXPECT_EQ(dst, src);
}

TEST(tcp_transport_test,
     many_blocks_cross_header_pieces_and_every_size_counts) {
  // Sizes travel 4,096 to a piece: 10,000 blocks take three, and a size
  // wrong in the last piece is still refused before any payload lands.
  auto ends = connect_pair();
  ASSERT_TRUE(ends.client && ends.server);
  constexpr std::size_t n = 10'000;
  std::vector<std::size_t> offsets(n + 1, 0);
  for (std::size_t i = 0; i < n; ++i)
    offsets[i + 1] = offsets[i] + i % 7; // every 7th block is empty
  const auto src = pattern(offsets[n], 8);
  std::vector<send_block> out;
  for (std::size_t i = 0; i < n; ++i)
    out.push_back({src.data() + offsets[i], i % 7});
  std::vector<std::byte> dst(offsets[n], std::byte{0x5a});
  std::vector<recv_block> in;
  for (std::size_t i = 0; i < n; ++i)
    in.push_back({dst.data() + offsets[i], i % 7});

  auto sent =
      std::async(std::launch::async, [&] { return ends.client->send(0, out); });
  auto got = ends.server->recv(0, in);
  ASSERT_TRUE(got) << got.error().describe();
  ASSERT_TRUE(sent.get());
  EXPECT_EQ(dst, src);

  std::fill(dst.begin(), dst.end(), std::byte{0x5a});
  in.back().bytes += 1; // the last block, in the third piece
  sent =
      std::async(std::launch::async, [&] { return ends.client->send(0, out); });
  got = ends.server->recv(0, in);
  // The sender learns of it too, from what the receiver said it expects.
  expect_mismatch(sent.get(), "tcp send: peer expected blocks of other "
                              "sizes than the 10000 sent");
  expect_mismatch(got, "tcp recv: peer sent blocks of other sizes than the "
                       "10000 expected");
  EXPECT_TRUE(std::all_of(dst.begin(), dst.end(),
                          [](std::byte b) { return b == std::byte{0x5a}; }));
}

TEST(tcp_transport_test, both_ends_exchange_large_batches_at_once) {
  auto ends = connect_pair();
  ASSERT_TRUE(ends.client && ends.server);
  constexpr std::size_t n = 8 << 20; // larger than the socket buffers
  const auto a = pattern(n, 1);
  const auto b = pattern(n, 2);
  std::vector<std::byte> at_a(n);
  std::vector<std::byte> at_b(n);
  const send_block from_a{a.data(), n};
  const send_block from_b{b.data(), n};
  const recv_block into_a{at_a.data(), n};
  const recv_block into_b{at_b.data(), n};
  auto other = std::async(std::launch::async, [&] {
    return ends.server->exchange(0, {&from_b, 1}, {&into_b, 1});
  });
  auto mine = ends.client->exchange(0, {&from_a, 1}, {&into_a, 1});
  ASSERT_TRUE(mine) << mine.error().describe();
  ASSERT_TRUE(other.get());
  EXPECT_EQ(at_a, b);
  EXPECT_EQ(at_b, a);
}

TEST(tcp_transport_test,
     a_size_mismatch_is_refused_before_any_payload_is_written) {
  auto ends = connect_pair();
  ASSERT_TRUE(ends.client && ends.server);
  const auto src = pattern(1000, 3);
  const send_block out{src.data(), src.size()};
  std::vector<std::byte> dst(999, std::byte{0x5a});
  const recv_block in{dst.data(), dst.size()};
  auto sent = std::async(std::launch::async, [&] {
    return ends.client->send(0, {&out, 1});
  });
  auto got = ends.server->recv(0, {&in, 1});
  expect_mismatch(
      got, "tcp recv: peer sent blocks of other sizes than the 1 expected");
  EXPECT_TRUE(std::all_of(dst.begin(), dst.end(),
                          [](std::byte b) { return b == std::byte{0x5a}; }));
  // Both sides report it, in the same exchange.
  expect_mismatch(sent.get(), "tcp send: peer expected blocks of other "
                              "sizes than the 1 sent");
}

TEST(tcp_transport_test, a_closed_peer_or_a_silent_one_is_an_io_error) {
  auto ends = connect_pair();
  ASSERT_TRUE(ends.client && ends.server);
  std::vector<std::byte> dst(16);
  const recv_block in{dst.data(), dst.size()};
  ends.client.reset();
  auto got = ends.server->recv(0, {&in, 1});
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error().code, errc::io_error);

  auto listener = tcp_listener::listen();
  ASSERT_TRUE(listener);
  auto client = tcp_transport::connect("127.0.0.1", listener->port(), 200ms);
  ASSERT_TRUE(client);
  auto silent = (*client)->recv(0, {&in, 1}); // nobody accepts or sends
  ASSERT_FALSE(silent);
  EXPECT_EQ(silent.error().code, errc::io_error);
  EXPECT_NE(silent.error().message.find("timed out"), std::string::npos)
      << silent.error().message;
}

TEST(tcp_transport_test, a_failed_exchange_leaves_the_connection_unusable) {
  auto ends = connect_pair();
  ASSERT_TRUE(ends.client && ends.server);
  // 1,000 bytes whose first 32 look like a frame of one 4-byte block.
  std::vector<std::byte> src(1000);
  auto frame = frame_head({4});
  frame.insert(frame.end(), {'E', 'V', 'I', 'L'});
  std::memcpy(src.data(), frame.data(), frame.size());
  const send_block out{src.data(), src.size()};
  // The send waits for the receiver's (empty) frame: run it beside it.
  auto sent = std::async(std::launch::async, [&] {
    return ends.client->send(0, {&out, 1});
  });
  std::vector<std::byte> short_buf(999);
  const recv_block wrong{short_buf.data(), short_buf.size()};
  EXPECT_EQ(ends.server->recv(0, {&wrong, 1}).error().code,
            errc::wrong_value_size);
  expect_mismatch(sent.get(), "tcp send: peer expected blocks of other sizes");
  // The rest of that frame is still in the stream; it must not be read as
  // a new one.
  std::array<std::byte, 4> four{};
  const recv_block next{four.data(), four.size()};
  auto again = ends.server->recv(0, {&next, 1});
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, errc::unavailable);
  EXPECT_NE(again.error().message.find("connect again"), std::string::npos)
      << again.error().message;
  // The peer's send failed too, which left its end unusable as well.
  auto peer = ends.client->recv(0, {&next, 1});
  ASSERT_FALSE(peer);
  EXPECT_EQ(peer.error().code, errc::unavailable) << peer.error().describe();
}

TEST(tcp_transport_test, a_batch_for_a_peer_expecting_none_is_refused_at_once) {
  // Every exchange carries a frame, an empty side one of 0 blocks: a
  // batch the receiver did not ask for is a mismatch, not left in the
  // stream for its next receive to take. The sender learns of it from
  // the receiver's frame, which says it expects none.
  auto ends = connect_pair();
  ASSERT_TRUE(ends.client && ends.server);
  const auto src = pattern(16, 4);
  const send_block out{src.data(), src.size()};
  auto sent = std::async(std::launch::async, [&] {
    return ends.client->send(0, {&out, 1});
  });
  auto nothing = ends.server->exchange(0, {}, {});
  expect_mismatch(sent.get(), "tcp send: peer expected 0 blocks, sent 1");
  expect_mismatch(nothing, "tcp recv: peer sent 1 blocks, expected 0");
  std::vector<std::byte> dst(16);
  const recv_block in{dst.data(), dst.size()};
  EXPECT_EQ(ends.server->recv(0, {&in, 1}).error().code, errc::unavailable);
}

TEST(tcp_transport_test, expecting_blocks_from_a_peer_sending_none_is_refused) {
  // The peer's frame of 0 blocks answers at once: a mismatch, not a wait
  // for the 5 s timeout (io_error), on both sides.
  auto ends = connect_pair();
  ASSERT_TRUE(ends.client && ends.server);
  auto none = std::async(std::launch::async,
                         [&] { return ends.client->exchange(0, {}, {}); });
  std::vector<std::byte> dst(16);
  const recv_block in{dst.data(), dst.size()};
  auto got = ends.server->recv(0, {&in, 1});
  expect_mismatch(none.get(), "tcp send: peer expected 1 blocks, sent 0");
  expect_mismatch(got, "tcp recv: peer sent 0 blocks, expected 1");
}

TEST(tcp_transport_test, a_receive_into_the_bytes_being_sent_is_refused) {
  // The send runs on a helper thread while the receive writes: an in-place
  // swap mixed old and new bytes on the wire. Refused before anything is
  // sent, and the connection stays usable.
  auto ends = connect_pair();
  ASSERT_TRUE(ends.client && ends.server);
  std::vector<std::byte> buf = pattern(8192, 3);
  const send_block out[] = {{buf.data(), 4096}, {buf.data() + 4096, 1024}};
  const recv_block in[] = {{buf.data() + 6000, 100}, {buf.data() + 5000, 200}};
  auto r = ends.client->exchange(0, out, in);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, errc::invalid_argument) << r.error().describe();
  // Adjacent, not overlapping: accepted (and the stream is in step).
  const recv_block next[] = {{buf.data() + 5120, 3072}};
  std::vector<std::byte> peer_out = pattern(3072, 4);
  const send_block back[] = {{peer_out.data(), peer_out.size()}};
  std::vector<std::byte> got(5120);
  const recv_block peer_in[] = {{got.data(), 4096}, {got.data() + 4096, 1024}};
  auto other = std::async(std::launch::async, [&] {
    return ends.server->exchange(0, back, peer_in);
  });
  auto ok = ends.client->exchange(0, out, next);
  ASSERT_TRUE(ok) << ok.error().describe();
  ASSERT_TRUE(other.get());
  EXPECT_TRUE(std::equal(got.begin(), got.end(), pattern(8192, 3).begin()));
  EXPECT_TRUE(std::equal(peer_out.begin(), peer_out.end(), buf.begin() + 5120));
}

TEST(tcp_transport_test, empty_exchanges_pair_up_and_keep_the_stream_in_step) {
  auto ends = connect_pair();
  ASSERT_TRUE(ends.client && ends.server);
  const auto src = pattern(32, 6);
  const send_block out{src.data(), src.size()};
  std::vector<std::byte> dst(32);
  const recv_block in{dst.data(), dst.size()};
  for (int round = 0; round < 3; ++round) {
    auto peer = std::async(std::launch::async,
                           [&] { return ends.server->exchange(0, {}, {}); });
    auto mine = ends.client->exchange(0, {}, {});
    ASSERT_TRUE(mine) << mine.error().describe();
    ASSERT_TRUE(peer.get());
    auto sent = std::async(std::launch::async, [&] {
      return ends.client->send(0, {&out, 1});
    });
    auto got = ends.server->recv(0, {&in, 1});
    ASSERT_TRUE(got) << got.error().describe();
    ASSERT_TRUE(sent.get());
    EXPECT_EQ(dst, src);
  }
}

/// A raw peer on a thread: connects to 127.0.0.1:port, sends `bytes`,
/// then reads until the other end closes or shuts down (so that closing
/// cannot reset the connection before the bytes are read).
std::thread raw_peer(std::uint16_t port, std::vector<unsigned char> bytes) {
  return std::thread([port, bytes = std::move(bytes)] {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
      (void)::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
      char sink[64];
      while (::recv(fd, sink, sizeof sink, 0) > 0) {
      }
    }
    ::close(fd);
  });
}

TEST(tcp_transport_test, a_peer_whose_digest_lies_is_refused_by_the_sizes) {
  // The digests only find a mismatch early: a peer whose header's digest
  // does not match its sizes still cannot make the receiver write a byte
  // out of bounds.
  auto listener = tcp_listener::listen();
  ASSERT_TRUE(listener);
  auto frame = frame_head({1000}, std::vector<std::uint64_t>{999});
  frame.resize(frame.size() + 1000, 'x');
  std::thread peer = raw_peer(listener->port(), std::move(frame));
  auto server = listener->accept(5s, 5s);
  ASSERT_TRUE(server) << server.error().describe();
  std::vector<std::byte> dst(999, std::byte{0x5a});
  const recv_block in{dst.data(), dst.size()};
  auto got = (*server)->recv(0, {&in, 1});
  server->reset(); // closes this end, which ends the peer's reads
  peer.join();
  expect_mismatch(got, "tcp recv: block 0 has 1000 bytes, expected 999");
  EXPECT_TRUE(std::all_of(dst.begin(), dst.end(),
                          [](std::byte b) { return b == std::byte{0x5a}; }));
}

TEST(tcp_transport_test,
     a_mismatch_while_both_send_large_batches_ends_at_once) {
  // Each side finds the mismatch in the other's header, lets its own
  // header out, then stops its sender: neither waits for the other to
  // drain megabytes it will never read (which would last until the
  // timeout).
  auto ends = connect_pair();
  ASSERT_TRUE(ends.client && ends.server);
  constexpr std::size_t n = 8 << 20; // larger than the socket buffers
  const auto a = pattern(n, 1);
  const auto b = pattern(n, 2);
  std::vector<std::byte> at_a(n);
  std::vector<std::byte> at_b(n - 1);
  const send_block from_a{a.data(), n};
  const send_block from_b{b.data(), n};
  const recv_block into_a{at_a.data(), at_a.size()};
  const recv_block into_b{at_b.data(), at_b.size()};
  auto other = std::async(std::launch::async, [&] {
    return ends.server->exchange(0, {&from_b, 1}, {&into_b, 1});
  });
  auto mine = ends.client->exchange(0, {&from_a, 1}, {&into_a, 1});
  expect_mismatch(mine, "tcp send: peer expected blocks of other sizes");
  expect_mismatch(other.get(), "tcp recv: peer sent blocks of other sizes");
}

/// Expects an exchange with a raw peer that sends `frame` (an older wire
/// version's) to fail with errc::parse_error naming `version`.
void expect_old_version_refused(std::vector<unsigned char> frame,
                                std::string_view version) {
  auto listener = tcp_listener::listen();
  ASSERT_TRUE(listener);
  std::thread peer = raw_peer(listener->port(), std::move(frame));
  auto server = listener->accept(5s, 5s);
  ASSERT_TRUE(server) << server.error().describe();
  auto got = (*server)->exchange(0, {}, {});
  server->reset(); // closes this end, which ends the peer's reads
  peer.join();
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error().code, errc::parse_error);
  EXPECT_NE(got.error().message.find(version), std::string::npos)
      << got.error().message;
}

TEST(tcp_transport_test, a_peer_of_an_older_wire_version_is_refused_saying_so) {
  // Version 1 frames ("KVFB") carried no expectation: the header is
  // longer now, and reading one as the other would misplace every field.
  // A version 1 frame of 0 blocks:
  expect_old_version_refused({'K', 'V', 'F', 'B', 0, 0, 0, 0},
                             "wire version 1");
  // Version 2 frames carried the same header, but their peers sent no
  // confirmation: each side would wait for one until the timeout.
  auto v2 = frame_head({});
  v2[3] = '2';
  expect_old_version_refused(std::move(v2), "wire version 2");
  // Version 3 peers confirmed every frame, empty ones too: a mark this
  // side does not read would be taken for the next frame's start.
  auto v3 = frame_head({});
  v3[3] = '3';
  expect_old_version_refused(std::move(v3), "wire version 3");
}

TEST(tcp_transport_test, a_send_the_peer_never_confirms_is_no_success) {
  // The peer's frame says it expects the one 16 KiB block this side
  // sends, but it never reads it (it gave up: its own timeout, a crash):
  // the block fits in the socket buffers, so the send wrote it all. It
  // was not received, and the send says so. (Before, it succeeded: a
  // caller that then dropped its copy lost the block.)
  auto listener = tcp_listener::listen();
  ASSERT_TRUE(listener);
  constexpr std::size_t n = 16 << 10;
  std::thread peer = raw_peer(listener->port(), frame_head({}, {}, {n}));
  auto server = listener->accept(5s, 200ms);
  ASSERT_TRUE(server) << server.error().describe();
  const auto data = pattern(n, 3);
  const send_block out{data.data(), n};
  auto sent = (*server)->send(0, {&out, 1});
  server->reset();
  peer.join();
  ASSERT_FALSE(sent) << "a batch the peer never read counted as sent";
  EXPECT_EQ(sent.error().code, errc::io_error) << sent.error().describe();
  EXPECT_NE(sent.error().message.find("did not confirm"), std::string::npos)
      << sent.error().message;
}

TEST(tcp_transport_test, a_receive_only_side_waits_for_no_confirmation) {
  // The peer sends one block and expects none: this side confirms it and
  // is done, without waiting for a confirmation the peer owes nobody
  // (before, it waited for one, and a peer slow to send it failed this
  // side after it had the block and had confirmed it).
  auto listener = tcp_listener::listen();
  ASSERT_TRUE(listener);
  auto frame = frame_head({16});
  frame.resize(frame.size() + 16, 'k');
  std::thread peer = raw_peer(listener->port(), std::move(frame));
  auto server = listener->accept(5s, 200ms);
  ASSERT_TRUE(server) << server.error().describe();
  std::vector<std::byte> dst(16);
  const recv_block in{dst.data(), dst.size()};
  auto got = (*server)->recv(0, {&in, 1});
  server->reset();
  peer.join();
  ASSERT_TRUE(got) << got.error().describe();
  EXPECT_TRUE(std::all_of(dst.begin(), dst.end(),
                          [](std::byte b) { return b == std::byte{'k'}; }));
}

TEST(tcp_transport_test, the_timeout_bounds_a_whole_exchange) {
  auto listener = tcp_listener::listen();
  ASSERT_TRUE(listener);
  const std::uint16_t port = listener->port();
  std::promise<void> server_done;
  auto done = server_done.get_future();
  // A raw peer that sends a frame header for one 20-byte block, then
  // trickles the payload a byte every 100 ms: each byte comes well inside
  // the 300 ms timeout, the whole block only after 2 s.
  std::thread peer([port, &done] {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
      const auto head = frame_head({20});
      (void)::send(fd, head.data(), head.size(), MSG_NOSIGNAL);
      for (int i = 0; i < 20; ++i) {
        // Paces the peer (the only wait here); ends early once the
        // receiver has given up.
        if (done.wait_for(100ms) == std::future_status::ready)
          break;
        const char b = 'x';
        if (::send(fd, &b, 1, MSG_NOSIGNAL) != 1)
          break;
      }
    }
    ::close(fd);
  });
  auto server = listener->accept(5s, 300ms);
  ASSERT_TRUE(server) << server.error().describe();
  std::vector<std::byte> dst(20);
  const recv_block in{dst.data(), dst.size()};
  auto got = (*server)->recv(0, {&in, 1});
  server_done.set_value();
  peer.join();
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error().code, errc::io_error);
  EXPECT_NE(got.error().message.find("timed out"), std::string::npos)
      << got.error().message;
}

TEST(tcp_transport_test, a_passed_deadline_ends_a_transfer_with_bytes_ready) {
  // A peer that streams steadily (or drains steadily) keeps the socket
  // ready at every check: the exchange's deadline must end the transfer
  // anyway, on the receive and on the send side, or it stretches for as
  // long as the peer keeps going.
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
  const auto bytes = pattern(64, 7);
  ASSERT_EQ(::send(fds[1], bytes.data(), bytes.size(), MSG_NOSIGNAL), 64);
  std::vector<std::byte> got(64);
  const auto passed = internal::tcp_clock::now() - 1ms;
  auto late_recv = internal::recv_all(fds[0], got.data(), got.size(), passed);
  auto late_send = internal::send_all(fds[0], bytes.data(), 8, passed);
  // Before its deadline the same transfer goes through.
  const auto later = internal::tcp_clock::now() + 5s;
  auto in_time = internal::recv_all(fds[0], got.data(), got.size(), later);
  ::close(fds[0]);
  ::close(fds[1]);
  ASSERT_FALSE(late_recv);
  EXPECT_EQ(late_recv.error().code, errc::io_error);
  EXPECT_NE(late_recv.error().message.find("timed out"), std::string::npos)
      << late_recv.error().message;
  ASSERT_FALSE(late_send);
  EXPECT_EQ(late_send.error().code, errc::io_error);
  EXPECT_NE(late_send.error().message.find("timed out"), std::string::npos)
      << late_send.error().message;
  ASSERT_TRUE(in_time) << in_time.error().describe();
  EXPECT_EQ(got, bytes);
}

addrinfo stream_address(sockaddr_in& a, addrinfo* next) {
  addrinfo ai{};
  ai.ai_family = AF_INET;
  ai.ai_socktype = SOCK_STREAM;
  ai.ai_addr = reinterpret_cast<sockaddr*>(&a);
  ai.ai_addrlen = sizeof a;
  ai.ai_next = next;
  return ai;
}

sockaddr_in ipv4(const char* address, std::uint16_t port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  EXPECT_EQ(::inet_pton(AF_INET, address, &a.sin_addr), 1) << address;
  return a;
}

TEST(tcp_listener_test, listen_tries_each_address_until_one_binds) {
  // A name can resolve to several addresses (IPv6 and IPv4, say); one that
  // cannot be bound must not stop the listener from using the next.
  auto taken = tcp_listener::listen("127.0.0.1", 0);
  ASSERT_TRUE(taken) << taken.error().describe();
  sockaddr_in in_use = ipv4("127.0.0.1", taken->port());
  sockaddr_in free_port = ipv4("127.0.0.1", 0);
  addrinfo second = stream_address(free_port, nullptr);
  addrinfo first = stream_address(in_use, &second);
  auto fd = internal::bind_and_listen(&first, "test");
  ASSERT_TRUE(fd) << fd.error().describe();
  sockaddr_in bound{};
  socklen_t len = sizeof bound;
  EXPECT_EQ(::getsockname(*fd, reinterpret_cast<sockaddr*>(&bound), &len), 0);
  EXPECT_NE(ntohs(bound.sin_port), taken->port());
  ::close(*fd);

  // None binds: the error is the last address's.
  sockaddr_in not_here = ipv4("192.0.2.1", 0); // TEST-NET-1, no interface
  addrinfo last = stream_address(in_use, nullptr);
  addrinfo not_local = stream_address(not_here, &last);
  auto none = internal::bind_and_listen(&not_local, "test:1");
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, errc::io_error);
  EXPECT_NE(none.error().message.find("test:1"), std::string::npos)
      << none.error().message;
  EXPECT_NE(none.error().message.find(std::strerror(EADDRINUSE)),
            std::string::npos)
      << none.error().message;
}

/// Connects to `listener`, which nobody accepts from, until its queue is
/// full (backlog 16): the kernel then drops further handshakes, so a
/// connect to it waits for its timeout. The connections stay in `queued`;
/// the result is the first connect that failed.
result<std::unique_ptr<tcp_transport>>
fill_accept_queue(const tcp_listener& listener,
                  std::vector<std::unique_ptr<tcp_transport>>& queued) {
  result<std::unique_ptr<tcp_transport>> c =
      make_error(errc::io_error, "not tried");
  for (int i = 0; i < 64; ++i) {
    c = tcp_transport::connect("127.0.0.1", listener.port(), 100ms);
    if (!c)
      break;
    queued.push_back(std::move(*c));
  }
  return c;
}

TEST(tcp_transport_test, a_connect_that_times_out_says_so) {
  auto listener = tcp_listener::listen();
  ASSERT_TRUE(listener);
  std::vector<std::unique_ptr<tcp_transport>> queued;
  auto c = fill_accept_queue(*listener, queued);
  ASSERT_FALSE(c) << "64 connections queued without accept";
  EXPECT_EQ(c.error().code, errc::io_error);
  EXPECT_NE(c.error().message.find("timed out after 100 ms"), std::string::npos)
      << c.error().message;
}

TEST(tcp_transport_test, the_connect_timeout_bounds_all_addresses_together) {
  // A name can resolve to several addresses that do not answer: together
  // they get the timeout once, not once each. The first address here
  // never answers (a full accept queue), so it uses up the whole 100 ms
  // and the second, which would answer, is not tried.
  auto full = tcp_listener::listen();
  ASSERT_TRUE(full);
  std::vector<std::unique_ptr<tcp_transport>> queued;
  ASSERT_FALSE(fill_accept_queue(*full, queued))
      << "64 connections queued without accept";
  auto open = tcp_listener::listen();
  ASSERT_TRUE(open);
  sockaddr_in silent = ipv4("127.0.0.1", full->port());
  sockaddr_in answering = ipv4("127.0.0.1", open->port());
  addrinfo second = stream_address(answering, nullptr);
  addrinfo first = stream_address(silent, &second);
  auto fd = internal::connect_first(&first, 100ms, "test:1");
  if (fd)
    ::close(*fd);
  ASSERT_FALSE(fd) << "connected to the second address after the first "
                      "had used up the timeout";
  EXPECT_EQ(fd.error().code, errc::io_error);
  EXPECT_NE(fd.error().message.find(
                "tcp connect(test:1): timed out after 100 ms (tried 1 of 2 "
                "addresses)"),
            std::string::npos)
      << fd.error().message;

  // An address that fails at once leaves the time to the next one.
  sockaddr_in refusing = ipv4("127.0.0.1", 1);
  addrinfo then_open = stream_address(answering, nullptr);
  addrinfo refused_first = stream_address(refusing, &then_open);
  auto next = internal::connect_first(&refused_first, 5s, "test:2");
  ASSERT_TRUE(next) << next.error().describe();
  ::close(*next);
  // None answers: the last one's error, and how many were tried.
  addrinfo refused_too = stream_address(refusing, nullptr);
  addrinfo refused_twice = stream_address(refusing, &refused_too);
  auto none = internal::connect_first(&refused_twice, 5s, "test:3");
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, errc::io_error);
  EXPECT_NE(none.error().message.find(std::strerror(ECONNREFUSED)),
            std::string::npos)
      << none.error().message;
  EXPECT_NE(none.error().message.find("(tried 2 of 2 addresses)"),
            std::string::npos)
      << none.error().message;
}

/// A name lookup for connect_host that answers `answer` only once the
/// test releases it (no sleeps: the test releases it after its
/// assertions), recording the names it was asked for. Should a connect
/// wait for the lookup (the bug these tests guard against), the lookup
/// gives up waiting for the release after 10 s, so the test fails on its
/// time bound instead of hanging.
class held_lookup {
public:
  explicit held_lookup(engine::host_lookup_result answer)
      : state_(std::make_shared<state>(std::move(answer))) {}

  [[nodiscard]] engine::host_lookup_fn fn() const {
    return [s = state_](const std::string& host) {
      std::unique_lock<std::mutex> lock(s->mutex);
      s->asked.push_back(host);
      (void)s->released_cv.wait_for(lock, 10s, [&] { return s->released; });
      return s->answer;
    };
  }
  void release() {
    const std::lock_guard<std::mutex> lock(state_->mutex);
    state_->released = true;
    state_->released_cv.notify_all();
  }
  /// The names looked up so far (a lookup's helper thread may not have
  /// entered it yet).
  [[nodiscard]] std::vector<std::string> asked() const {
    const std::lock_guard<std::mutex> lock(state_->mutex);
    return state_->asked;
  }

private:
  struct state {
    explicit state(engine::host_lookup_result a) : answer(std::move(a)) {}
    std::mutex mutex;
    std::condition_variable released_cv;
    bool released = false;          ///< under `mutex`
    std::vector<std::string> asked; ///< under `mutex`
    const engine::host_lookup_result answer;
  };
  std::shared_ptr<state> state_;
};

/// A lookup that answers at once.
engine::host_lookup_fn answering(std::vector<std::string> addresses) {
  return [addresses = std::move(addresses)](
             const std::string&) -> engine::host_lookup_result {
    return addresses;
  };
}

TEST(tcp_transport_test, a_name_lookup_that_outlasts_the_timeout_is_a_timeout) {
  // getaddrinfo has no timeout: a DNS that does not answer must not hold
  // a connect past io_timeout. The lookup here would answer a listening
  // address, but only after the test is done.
  auto listener = tcp_listener::listen();
  ASSERT_TRUE(listener);
  held_lookup slow(std::vector<std::string>{"127.0.0.1"});
  engine::host_resolver resolver(slow.fn());
  const auto began = std::chrono::steady_clock::now();
  auto fd =
      internal::connect_host("slow.example", listener->port(), 100ms, resolver);
  const auto took = std::chrono::steady_clock::now() - began;
  if (fd)
    ::close(*fd);
  slow.release();
  ASSERT_FALSE(fd) << "connected after the lookup had used up the timeout";
  EXPECT_EQ(fd.error().code, errc::io_error);
  const std::string where = "slow.example:" + std::to_string(listener->port());
  EXPECT_NE(
      fd.error().message.find("tcp connect(" + where +
                              "): timed out after 100 ms: the name lookup of "
                              "'slow.example' took all of it"),
      std::string::npos)
      << fd.error().message;
  // A functional bound (the lookup would hold it 10 s), not a speed bar.
  EXPECT_LT(took, 5s);
}

TEST(tcp_transport_test, a_numeric_address_connects_without_a_lookup) {
  auto listener = tcp_listener::listen();
  ASSERT_TRUE(listener);
  held_lookup never(std::vector<std::string>{"192.0.2.1"});
  engine::host_resolver resolver(never.fn());
  auto fd = internal::connect_host("127.0.0.1", listener->port(), 5s, resolver);
  never.release();
  ASSERT_TRUE(fd) << fd.error().describe();
  auto accepted = listener->accept(5s, 5s);
  ::close(*fd);
  ASSERT_TRUE(accepted) << accepted.error().describe();
  EXPECT_TRUE(never.asked().empty());
  // The public connect too (it has no lookup to inject).
  auto c = tcp_transport::connect("127.0.0.1", listener->port(), 5s);
  ASSERT_TRUE(c) << c.error().describe();
  ASSERT_TRUE(listener->accept(5s, 5s));
}

TEST(tcp_transport_test, a_looked_up_name_connects_in_the_time_left) {
  auto listener = tcp_listener::listen();
  ASSERT_TRUE(listener);
  // The lookup answers at once; its first address refuses (the listener
  // is bound to 127.0.0.1 only), the second listens: the connect goes on
  // through the name's addresses in the lookup's order.
  engine::host_resolver resolver(answering({"127.0.0.2", "127.0.0.1"}));
  const std::uint16_t port = listener->port();
  auto fd = internal::connect_host("fast.example", port, 5s, resolver);
  ASSERT_TRUE(fd) << fd.error().describe();
  sockaddr_in peer{};
  socklen_t len = sizeof peer;
  EXPECT_EQ(::getpeername(*fd, reinterpret_cast<sockaddr*>(&peer), &len), 0);
  ::close(*fd);
  EXPECT_EQ(ntohs(peer.sin_port), port);
  EXPECT_EQ(ntohl(peer.sin_addr.s_addr), INADDR_LOOPBACK);
  auto accepted = listener->accept(5s, 5s);
  ASSERT_TRUE(accepted) << accepted.error().describe();

  // The lookup's time counts against the connect: with the deadline
  // already spent by it, no address is tried, even one that would answer.
  sockaddr_in open_address = ipv4("127.0.0.1", port);
  addrinfo open = stream_address(open_address, nullptr);
  auto late = internal::connect_first(&open, 100ms, "test:4",
                                      std::chrono::steady_clock::now() - 100ms);
  if (late)
    ::close(*late);
  ASSERT_FALSE(late) << "connected after the lookup had used up the timeout";
  EXPECT_EQ(late.error().code, errc::io_error);
  EXPECT_NE(late.error().message.find("tcp connect(test:4): timed out after "
                                      "100 ms"),
            std::string::npos)
      << late.error().message;
}

TEST(tcp_transport_test,
     a_name_that_does_not_resolve_is_an_io_error_saying_why) {
  engine::host_resolver resolver(
      [](const std::string& host) -> engine::host_lookup_result {
        return make_error(errc::not_found, "cannot resolve '" + host +
                                               "': Name or service not known");
      });
  auto fd = internal::connect_host("nosuch.example", 7, 5s, resolver);
  ASSERT_FALSE(fd);
  EXPECT_EQ(fd.error().code, errc::io_error);
  EXPECT_NE(fd.error().message.find("tcp connect(nosuch.example:7): cannot "
                                    "resolve 'nosuch.example'"),
            std::string::npos)
      << fd.error().message;
  // A lookup that gives something other than an address.
  engine::host_resolver odd(answering({"not-an-address"}));
  auto bad = internal::connect_host("odd.example", 7, 5s, odd);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, errc::io_error);
  EXPECT_NE(bad.error().message.find("the name lookup gave 'not-an-address'"),
            std::string::npos)
      << bad.error().message;
}

// getaddrinfo has no timeout: a DNS that does not answer must not hold a
// listen without bound either (before, listen() called getaddrinfo on the
// caller's thread, with nothing to bound it).
TEST(tcp_transport_test, a_bind_name_lookup_that_outlasts_its_timeout_fails) {
  held_lookup slow(std::vector<std::string>{"127.0.0.1"});
  engine::host_resolver resolver(slow.fn());
  auto fd = internal::listen_host("slow.example", 0, 100ms, resolver);
  if (fd)
    ::close(*fd);
  slow.release();
  ASSERT_FALSE(fd) << "listened after the lookup had used up the timeout";
  EXPECT_EQ(fd.error().code, errc::timeout);
  EXPECT_NE(fd.error().message.find("tcp listen(slow.example:0): the name "
                                    "lookup of 'slow.example' did not finish "
                                    "within 100 ms"),
            std::string::npos)
      << fd.error().message;
}

TEST(tcp_transport_test, a_bind_address_is_looked_up_only_when_it_is_a_name) {
  held_lookup never(std::vector<std::string>{"192.0.2.1"});
  engine::host_resolver resolver(never.fn());
  auto fd = internal::listen_host("127.0.0.1", 0, 5s, resolver);
  never.release();
  ASSERT_TRUE(fd) << fd.error().describe();
  ::close(*fd);
  EXPECT_TRUE(never.asked().empty());
  // A name listens on the address its lookup gives.
  engine::host_resolver fast(answering({"127.0.0.1"}));
  auto named = internal::listen_host("fast.example", 0, 5s, fast);
  ASSERT_TRUE(named) << named.error().describe();
  sockaddr_in bound{};
  socklen_t len = sizeof bound;
  EXPECT_EQ(::getsockname(*named, reinterpret_cast<sockaddr*>(&bound), &len),
            0);
  ::close(*named);
  EXPECT_EQ(ntohl(bound.sin_addr.s_addr), INADDR_LOOPBACK);
  // A name that does not resolve, and a lookup that gives no address.
  engine::host_resolver missing(
      [](const std::string& host) -> engine::host_lookup_result {
        return make_error(errc::not_found, "cannot resolve '" + host + "'");
      });
  auto none = internal::listen_host("nosuch.example", 7, 5s, missing);
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, errc::io_error);
  EXPECT_NE(none.error().message.find("tcp listen(nosuch.example:7): cannot "
                                      "resolve 'nosuch.example'"),
            std::string::npos)
      << none.error().message;
  engine::host_resolver odd(answering({"not-an-address"}));
  auto bad = internal::listen_host("odd.example", 7, 5s, odd);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, errc::io_error);
  EXPECT_NE(bad.error().message.find("tcp listen(odd.example:7): the name "
                                     "lookup gave 'not-an-address'"),
            std::string::npos)
      << bad.error().message;
}

TEST(tcp_transport_test, timeouts_out_of_range_are_refused) {
  auto listener = tcp_listener::listen();
  ASSERT_TRUE(listener);
  for (const auto t : {0ms, -5ms, std::chrono::milliseconds(25h)}) {
    auto c = tcp_transport::connect("127.0.0.1", listener->port(), t);
    ASSERT_FALSE(c) << t.count();
    EXPECT_EQ(c.error().code, errc::invalid_argument);
    EXPECT_NE(c.error().message.find("io_timeout"), std::string::npos);
    EXPECT_EQ(listener->accept(1s, t).error().code, errc::invalid_argument);
    auto l = tcp_listener::listen("127.0.0.1", 0, t);
    ASSERT_FALSE(l) << t.count();
    EXPECT_EQ(l.error().code, errc::invalid_argument);
    EXPECT_NE(l.error().message.find("lookup_timeout"), std::string::npos);
  }
  EXPECT_EQ(listener->accept(-1ms, 1s).error().code, errc::invalid_argument);
  // A zero accept timeout only takes a connection already queued.
  auto none = listener->accept(0ms, 1s);
  ASSERT_FALSE(none);
  EXPECT_NE(none.error().message.find("timed out"), std::string::npos);
}

/// `n` zeroed (empty, valid) blocks in reserved address space that is
/// never written: a batch larger than memory, for the count checks.
template <class Block> class huge_batch {
public:
  explicit huge_batch(std::size_t n) : bytes_(n * sizeof(Block)) {
    void* p = ::mmap(nullptr, bytes_, PROT_READ,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p != MAP_FAILED)
      blocks_ = {static_cast<const Block*>(p), n};
  }
  ~huge_batch() {
    if (!blocks_.empty())
      ::munmap(const_cast<Block*>(blocks_.data()), bytes_);
  }
  huge_batch(const huge_batch&) = delete;
  huge_batch& operator=(const huge_batch&) = delete;
  [[nodiscard]] std::span<const Block> blocks() const { return blocks_; }

private:
  std::size_t bytes_;
  std::span<const Block> blocks_;
};

TEST(tcp_transport_test, more_blocks_than_a_frame_counts_are_refused) {
  // The count on the wire is a u32: 2^32 + 1 blocks would go out as 1.
  constexpr std::size_t n = (std::size_t{1} << 32) + 1;
  huge_batch<send_block> out(n);
  huge_batch<recv_block> in(n);
  if (out.blocks().empty() || in.blocks().empty())
    GTEST_SKIP() << "cannot reserve 2 x 64 GiB of address space";
  auto ends = connect_pair();
  ASSERT_TRUE(ends.client && ends.server);
  auto sent = ends.client->send(0, out.blocks());
  ASSERT_FALSE(sent);
  EXPECT_EQ(sent.error().code, errc::value_too_large);
  EXPECT_NE(sent.error().message.find("4294967297 blocks to send"),
            std::string::npos)
      << sent.error().message;
  EXPECT_NE(sent.error().message.find("at most 4294967295"), std::string::npos)
      << sent.error().message;
  auto got = ends.client->recv(0, in.blocks());
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error().code, errc::value_too_large);
  EXPECT_NE(got.error().message.find("4294967297 blocks to receive"),
            std::string::npos)
      << got.error().message;
  // Refused before anything moved: the connection still works.
  const auto src = pattern(16, 5);
  const send_block one{src.data(), src.size()};
  std::vector<std::byte> dst(16);
  const recv_block into{dst.data(), dst.size()};
  auto peer = std::async(std::launch::async, [&] {
    return ends.server->recv(0, {&into, 1});
  });
  ASSERT_TRUE(ends.client->send(0, {&one, 1}));
  ASSERT_TRUE(peer.get());
  EXPECT_EQ(dst, src);
}

TEST(tcp_transport_test, bad_arguments_are_refused) {
  auto ends = connect_pair();
  ASSERT_TRUE(ends.client);
  const send_block null_block{nullptr, 8};
  EXPECT_EQ(ends.client->send(0, {&null_block, 1}).error().code,
            errc::invalid_argument);
  EXPECT_EQ(ends.client->send(1, {}).error().code, errc::invalid_argument);
  auto nobody = tcp_transport::connect("127.0.0.1", 1, 1s);
  EXPECT_FALSE(nobody);
}

TEST(tcp_transport_test, a_host_with_a_nul_or_too_long_is_refused) {
  // getaddrinfo and inet_pton read C strings: "127.0.0.1\0junk" was cut at
  // the NUL and dialed 127.0.0.1.
  const std::string with_nul("127.0.0.1\0junk", 14);
  const std::string too_long(300, 'a');
  for (const std::string& host : {with_nul, too_long, std::string{}}) {
    auto c = tcp_transport::connect(host, 1, 1s);
    ASSERT_FALSE(c);
    EXPECT_EQ(c.error().code, errc::invalid_argument) << c.error().describe();
    auto l = tcp_listener::listen(host, 0);
    ASSERT_FALSE(l);
    EXPECT_EQ(l.error().code, errc::invalid_argument) << l.error().describe();
  }
}

TEST(tcp_listener_test, a_socket_connected_to_itself_is_told_apart) {
  // Bound to a port and connected to that same port: TCP's simultaneous
  // open connects it to itself, as a connect to a local port nobody
  // listens on can do when it picks that port as its own (every exchange
  // then reads back what it sent). connect refuses such a connection.
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0)
      << std::strerror(errno);
  EXPECT_TRUE(internal::is_connected_to_itself(fd));
  ::close(fd);
  // IPv6 too, where the host has ::1.
  const int fd6 = ::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in6 addr6{};
  addr6.sin6_family = AF_INET6;
  addr6.sin6_addr = in6addr_loopback;
  socklen_t len6 = sizeof addr6;
  if (fd6 >= 0 &&
      ::bind(fd6, reinterpret_cast<sockaddr*>(&addr6), sizeof addr6) == 0 &&
      ::getsockname(fd6, reinterpret_cast<sockaddr*>(&addr6), &len6) == 0 &&
      ::connect(fd6, reinterpret_cast<sockaddr*>(&addr6), sizeof addr6) == 0) {
    EXPECT_TRUE(internal::is_connected_to_itself(fd6));
  }
  if (fd6 >= 0)
    ::close(fd6);
  // Both ends of an ordinary connection are not; nor is a socket that is
  // not connected.
  sockaddr_in any_port = ipv4("127.0.0.1", 0);
  addrinfo one = stream_address(any_port, nullptr);
  auto listening = internal::bind_and_listen(&one, "test");
  ASSERT_TRUE(listening) << listening.error().describe();
  sockaddr_in bound{};
  socklen_t bound_len = sizeof bound;
  ASSERT_EQ(::getsockname(*listening, reinterpret_cast<sockaddr*>(&bound),
                          &bound_len),
            0);
  const int client = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_EQ(
      ::connect(client, reinterpret_cast<sockaddr*>(&bound), sizeof bound), 0)
      << std::strerror(errno);
  pollfd ready{*listening, POLLIN, 0};
  ASSERT_EQ(::poll(&ready, 1, 5000), 1);
  const int server = ::accept4(*listening, nullptr, nullptr, SOCK_CLOEXEC);
  ASSERT_GE(server, 0) << std::strerror(errno);
  EXPECT_FALSE(internal::is_connected_to_itself(client));
  EXPECT_FALSE(internal::is_connected_to_itself(server));
  ::close(client);
  ::close(server);
  ::close(*listening);
  const int other = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  EXPECT_FALSE(internal::is_connected_to_itself(other));
  ::close(other);
}

TEST(tcp_listener_test, two_threads_accepting_at_once_each_return) {
  // One connection, two accepts: one takes it, the other times out. The
  // listening socket blocked, so the one that lost the race slept in
  // accept4 until another connection came, past its timeout.
  auto listener = tcp_listener::listen("127.0.0.1", 0);
  ASSERT_TRUE(listener) << listener.error().describe();
  std::promise<void> go;
  std::shared_future<void> start = go.get_future().share();
  const auto accept_one = [&] {
    start.wait();
    return listener->accept(2s, 5s);
  };
  auto a = std::async(std::launch::async, accept_one);
  auto b = std::async(std::launch::async, accept_one);
  go.set_value();
  auto client = tcp_transport::connect("127.0.0.1", listener->port(), 5s);
  ASSERT_TRUE(client) << client.error().describe();
  // A bound on the test, not a timing bar: a stuck accept is woken by a
  // second connection, and the test fails instead of hanging.
  const bool a_done = a.wait_for(10s) == std::future_status::ready;
  const bool b_done = b.wait_for(10s) == std::future_status::ready;
  std::optional<result<std::unique_ptr<tcp_transport>>> rescue;
  if (!a_done || !b_done)
    rescue = tcp_transport::connect("127.0.0.1", listener->port(), 5s);
  EXPECT_TRUE(a_done && b_done) << "an accept did not return";
  auto ra = a.get();
  auto rb = b.get();
  EXPECT_EQ(static_cast<int>(ra.has_value()) + static_cast<int>(rb.has_value()),
            1);
  const auto& lost = ra ? rb : ra;
  ASSERT_FALSE(lost.has_value());
  EXPECT_NE(lost.error().message.find("timed out"), std::string::npos)
      << lost.error().describe();
  // The race above needs both threads past poll before either accepts, so
  // it rarely shows; what rules it out is a listening socket that never
  // blocks in accept4.
  sockaddr_in any_port = ipv4("127.0.0.1", 0);
  addrinfo one = stream_address(any_port, nullptr);
  auto fd = internal::bind_and_listen(&one, "test");
  ASSERT_TRUE(fd) << fd.error().describe();
  EXPECT_NE(::fcntl(*fd, F_GETFL) & O_NONBLOCK, 0);
  ::close(*fd);
}

TEST(tcp_listener_test, a_moved_from_listener_says_so_at_once) {
  auto listener = tcp_listener::listen("127.0.0.1", 0);
  ASSERT_TRUE(listener) << listener.error().describe();
  const auto port = listener->port();
  tcp_listener moved(std::move(*listener));
  EXPECT_EQ(moved.port(), port);
  EXPECT_EQ(listener->port(), 0);
  const auto start = std::chrono::steady_clock::now();
  auto r = listener->accept(10s, 1s); // waited the whole timeout before
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, errc::unavailable) << r.error().describe();
}

} // namespace
} // namespace kvfleet::cuda

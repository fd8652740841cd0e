package Net::Async::HTTP::Server::Protocol;

# One HTTP/1.1 connection of Net::Async::HTTP::Server (see there). Parses requests (bodies
# by Content-Length or chunked transfer encoding, keep-alive and pipelining), hands each to
# the server, and writes the responses back in the order the requests came in.

use strict;
use warnings;

use base qw( IO::Async::Stream );

use HTTP::Request;

our $VERSION = '0.14';

my $CRLF = "\x0d\x0a";

# Limits that keep a misbehaving peer from growing the buffer without bound.
my $MAX_HEADER_BYTES = 64 * 1024;
my $MAX_BODY_BYTES   = 64 * 1024 * 1024;

sub _init
{
   my $self = shift;
   $self->{requests} = [];   # Net::Async::HTTP::Server::Request, oldest first
   $self->SUPER::_init( @_ );
}

sub on_read
{
   my $self = shift;
   my ( $buffref, $eof ) = @_;

   if( $eof ) {
      $self->{read_eof} = 1;
      $self->close_when_empty unless @{ $self->{requests} };
      return 0;
   }

   return 0 if $self->{closing};

   if( my $partial = $self->{partial} ) {
      return $self->_read_body( $buffref, $partial );
   }

   # Leading empty lines before a request line are allowed (RFC 9112 2.2).
   $$buffref =~ s/^(?:\x0d?\x0a)+//;

   my $end = index( $$buffref, "$CRLF$CRLF" );
   if( $end < 0 ) {
      $self->_fail( 431, "Request Header Fields Too Large" ) if length $$buffref > $MAX_HEADER_BYTES;
      return 0;
   }

   my $head = substr( $$buffref, 0, $end + 4, "" );
   my ( $request_line ) = $head =~ m/^([^\x0d\x0a]*)/;
   my ( $method, $target, $protocol ) = $request_line =~ m{^(\S+) (\S+) (HTTP/\d\.\d)$}
      or return $self->_fail( 400, "Bad Request" );

   my $http_request = HTTP::Request->parse( $head );
   $http_request->method( $method );
   $http_request->uri( $target );
   $http_request->protocol( $protocol );

   if( ( $http_request->header( "Expect" ) // "" ) =~ m/^100-continue$/i and $protocol eq "HTTP/1.1" ) {
      $self->write( "HTTP/1.1 100 Continue$CRLF$CRLF" );
   }

   my $partial = { request => $http_request, body => "" };

   if( ( $http_request->header( "Transfer-Encoding" ) // "" ) =~ m/chunked/i ) {
      $partial->{chunked} = 1;
   }
   else {
      my $length = $http_request->header( "Content-Length" ) // 0;
      $length =~ m/^\s*(\d+)\s*$/ or return $self->_fail( 400, "Bad Request" );
      $partial->{remaining} = $1;
      return $self->_fail( 413, "Content Too Large" ) if $partial->{remaining} > $MAX_BODY_BYTES;
   }

   $self->{partial} = $partial;
   # Read what the buffer already holds now: Stream does not call on_read again for an empty
   # buffer, and a request without a body is complete already.
   1 while $self->{partial} and $self->_read_body( $buffref, $partial );
   return 1;
}

sub _read_body
{
   my $self = shift;
   my ( $buffref, $partial ) = @_;

   if( !$partial->{chunked} ) {
      my $take = $partial->{remaining};
      $take = length $$buffref if length $$buffref < $take;
      $partial->{body} .= substr( $$buffref, 0, $take, "" );
      $partial->{remaining} -= $take;
      return 0 if $partial->{remaining} > 0;
      return $self->_request_complete;
   }

   # Chunked: a size line, the data and its CRLF; a zero size, then trailers up to an empty line.
   if( $partial->{trailers} ) {
      my $end = index( $$buffref, $CRLF );
      return 0 if $end < 0;
      my $line = substr( $$buffref, 0, $end + 2, "" );
      return 1 unless $line eq $CRLF;
      return $self->_request_complete;
   }
   if( defined( my $size = $partial->{chunk_size} ) ) {
      return 0 if length $$buffref < $size + 2;
      $partial->{body} .= substr( $$buffref, 0, $size, "" );
      substr( $$buffref, 0, 2, "" ) eq $CRLF or return $self->_fail( 400, "Bad Request" );
      delete $partial->{chunk_size};
      return 1;
   }
   my $end = index( $$buffref, $CRLF );
   return 0 if $end < 0;
   my $line = substr( $$buffref, 0, $end + 2, "" );
   my ( $hex ) = $line =~ m/^([0-9A-Fa-f]{1,8})/ or return $self->_fail( 400, "Bad Request" );
   my $size = hex $hex;
   if( $size == 0 ) {
      $partial->{trailers} = 1;
   }
   else {
      return $self->_fail( 413, "Content Too Large" ) if length( $partial->{body} ) + $size > $MAX_BODY_BYTES;
      $partial->{chunk_size} = $size;
   }
   return 1;
}

sub _request_complete
{
   my $self = shift;

   my $partial = delete $self->{partial};
   my $http_request = $partial->{request};
   $http_request->content( $partial->{body} );
   if( $partial->{chunked} ) {
      $http_request->remove_header( "Transfer-Encoding" );
      $http_request->content_length( length $partial->{body} );
   }

   my $server = $self->parent;
   my $request = $server->make_request( $self, $http_request );
   push @{ $self->{requests} }, $request;

   $server->_received_request( $request );
   return 1;
}

# Answers a request the connection could not parse, then closes it.
sub _fail
{
   my $self = shift;
   my ( $code, $message ) = @_;

   $self->{closing} = 1;
   $self->write( "HTTP/1.1 $code $message${CRLF}Content-Length: 0${CRLF}Connection: close$CRLF$CRLF" );
   $self->close_when_empty;
   return 0;
}

# Called by a request once its response is complete: writes every finished response at the
# head of the queue, so that pipelined requests are answered in order.
sub _flush_requests
{
   my $self = shift;

   my $requests = $self->{requests};
   while( @$requests and $requests->[0]{is_done} ) {
      my $request = shift @$requests;
      $self->write( $request->_take_output ) unless $self->{closing};
      if( $request->_wants_close ) {
         $self->{closing} = 1;
         @$requests = ();
         $self->close_when_empty;
      }
   }
   # A response started with respond_chunk_header streams as it is written.
   if( @$requests and length( my $out = $requests->[0]->_take_output ) ) {
      $self->write( $out ) unless $self->{closing};
   }

   $self->close_when_empty if $self->{read_eof} and !@$requests;
}

sub on_closed
{
   my $self = shift;
   $_->{is_closed} = 1 for @{ $self->{requests} };
   $self->{requests} = [];
}

1;

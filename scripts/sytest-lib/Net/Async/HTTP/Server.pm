package Net::Async::HTTP::Server;

# A small HTTP/1.1 server for IO::Async, written for scripts/sytest because Debian does not
# package CPAN's Net::Async::HTTP::Server. It implements the interface SyTest relies on:
#
#   my $server = Net::Async::HTTP::Server->new( on_request => sub { my ( $self, $req ) = @_; ... } );
#   $loop->add( $server );
#   $server->listen( host => ..., service => ..., extensions => [ 'SSL' ], SSL_... => ... );
#
# Subclasses may define an on_request method instead, pass request_class (a subclass of
# Net::Async::HTTP::Server::Request) or override make_request. Each accepted connection is a
# Net::Async::HTTP::Server::Protocol child of the server; a request answers with
# $req->respond( $http_response ).

use strict;
use warnings;

use base qw( IO::Async::Listener );

use Carp qw( croak );

use Net::Async::HTTP::Server::Protocol;
use Net::Async::HTTP::Server::Request;

our $VERSION = '0.14';

sub _init
{
   my $self = shift;
   my ( $params ) = @_;

   $params->{handle_class}  = "Net::Async::HTTP::Server::Protocol";
   $params->{request_class} ||= "Net::Async::HTTP::Server::Request";

   $self->SUPER::_init( $params );
}

sub configure
{
   my $self = shift;
   my %params = @_;

   foreach (qw( on_request request_class )) {
      $self->{$_} = delete $params{$_} if exists $params{$_};
   }

   $self->SUPER::configure( %params );
}

sub _add_to_loop
{
   my $self = shift;

   $self->can_event( "on_request" )
      or croak "Expected either an on_request callback or an ->on_request method";

   $self->SUPER::_add_to_loop( @_ );
}

sub on_accept
{
   my $self = shift;
   my ( $conn ) = @_;

   $conn->configure(
      on_closed => sub {
         my ( $conn ) = @_;
         $conn->remove_from_parent if $conn->parent;
      },
   );

   $self->add_child( $conn );
   return $conn;
}

# make_request( $conn, $http_request ): a new request object of the configured class.
sub make_request
{
   my $self = shift;
   return $self->{request_class}->new( @_ );
}

sub _received_request
{
   my $self = shift;
   my ( $request ) = @_;

   $self->invoke_event( on_request => $request );
}

1;
